"""sim_node: the simulated cloth table as a ROS 2 robot, so the whole loop runs without hardware.

Publishes the top-down camera (sensor_msgs/Image rgb8, sensor-data QoS; with `wrist_view_m` also
a wrist camera looking down around the gripper, same stamp) and the gripper's joint state at their
own rates, steps the cloth at `control_rate_hz`, and executes `action` messages as a
position controller would (JointTrajectory: the first point, by joint name; or Float64MultiArray in
joint order), holding the last target when none arrives. With `step_on_action` (the default) a
new episode's clock starts with its first action, as the offline task's does: until then the cloth
waits and only camera frames and joint states go out. Services: `sim/reset` (std_srvs/Trigger;
the message is the new episode's seed) and `sim/evaluate` (std_srvs/Trigger; the message is JSON
with the fold's style, quality and success). A thin shell over `rko_ros.sim.task.ClothFoldTask`.
"""
import array
import json
import math
import sys
import time

import numpy as np
import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from rko_ros.errors import ConfigError
from rko_ros.ros.params import spin
from rko_ros.sim.render import VIEW_M, VIEW_RANGE_M, check_wrist_view_m
from rko_ros.sim.task import JOINT_NAMES, ClothFoldTask, TaskConfig

ACTION_TYPES = ('joint_trajectory', 'float64_multi_array')


def _float(description, default, low, high):
    return default, ParameterDescriptor(
        description=description, read_only=True,
        floating_point_range=[FloatingPointRange(from_value=low, to_value=high)])


def _int(description, default, low, high):
    return default, ParameterDescriptor(
        description=description, read_only=True,
        integer_range=[IntegerRange(from_value=low, to_value=high, step=1)])


def _str(description, default):
    return default, ParameterDescriptor(description=description, read_only=True)


PARAMETERS = {
    'camera_topic': _str('topic of the top-down camera image (rgb8)', 'camera/image_raw'),
    'camera_frame_id': _str('frame_id stamped on camera images', 'sim_camera'),
    'joint_state_topic': _str('topic of the gripper joint state', 'joint_states'),
    'action_topic': _str('topic of the commanded action', 'action'),
    'action_type': _str('joint_trajectory or float64_multi_array', 'joint_trajectory'),
    'control_rate_hz': _float('rate the simulation advances, one control tick each',
                              10.0, 1.0, 100.0),
    'camera_rate_hz': _float('rate of published camera images', 10.0, 0.5, 60.0),
    'joint_state_rate_hz': _float('rate of published joint states', 30.0, 0.5, 500.0),
    'image_width_px': _int('camera image width', 64, 8, 4096),
    'image_height_px': _int('camera image height', 64, 8, 4096),
    'camera_view_m': _float('metres of table across the camera image\'s shorter side (the '
                            'policy must be trained on the same view)', VIEW_M, *VIEW_RANGE_M),
    'wrist_view_m': _float('a second camera on the gripper, looking down: metres of table across '
                           'its image\'s shorter side, around the gripper (same size as the '
                           f'scene camera\'s); 0: no wrist camera, else {VIEW_RANGE_M[0]}..'
                           f'{VIEW_RANGE_M[1]}', 0.0, 0.0, VIEW_RANGE_M[1]),
    'wrist_camera_topic': _str('topic of the wrist camera image (rgb8), when wrist_view_m > 0',
                               'wrist_camera/image_raw'),
    'wrist_camera_frame_id': _str('frame_id stamped on wrist camera images', 'sim_wrist_camera'),
    'episode_ticks': _int('control ticks in one episode (reported by sim/evaluate)',
                          50, 1, 100000),
    'seed': _int('seed of the first episode; each sim/reset uses the next one', 0, 0, 2 ** 31 - 1),
    'step_on_action': (True, ParameterDescriptor(
        description='advance one tick as soon as an action arrives and publish the camera and '
                    'joint state right after it (the observe -> act timing of the offline task '
                    'the demonstrations were recorded with); the control timer then only '
                    'advances the sim when no action came for a period, and not before the '
                    'episode\'s first action (its ticks start with the policy, as offline: the '
                    'service calls that start an episode take no ticks from it). false: the control '
                    'timer alone advances the sim (a controller with its own clock, adding up '
                    'to a tick of latency)', read_only=True)),
    'hold_after_episode': (True, ParameterDescriptor(
        description='after episode_ticks the cell stops: actions are ignored and the cloth is '
                    'judged as it was at the end (the demonstrations end there too); false: it '
                    'keeps simulating until sim/reset', read_only=True)),
    'quality_threshold': _float('fold quality at or above which a fold succeeds', 0.7, 0.0, 1.0),
}


def image_message(image_rgb, stamp, frame_id):
    """sensor_msgs/Image (rgb8) from an (H, W, 3) uint8 array."""
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(image_rgb.shape[0]), int(image_rgb.shape[1])
    msg.encoding = 'rgb8'
    msg.is_bigendian = 0
    msg.step = 3 * msg.width
    # array('B') takes rclpy's fast path; a bytes object would be range-checked element by element.
    msg.data = array.array('B', np.ascontiguousarray(image_rgb, np.uint8).tobytes())
    return msg


class SimNode(Node):
    """The simulated robot: camera, joint states, action execution, reset and evaluation."""

    def __init__(self, **kwargs):
        super().__init__('sim_node', **kwargs)
        self.params = self._declare_and_validate()
        p = self.params
        self.task = ClothFoldTask(TaskConfig(
            image_size_px=(p['image_height_px'], p['image_width_px']), view_m=p['camera_view_m'],
            wrist_view_m=p['wrist_view_m'], control_rate_hz=p['control_rate_hz'], episode_ticks=p['episode_ticks'],
            quality_threshold=p['quality_threshold']))
        self._next_seed = p['seed']
        self._scene_changes, self._frame = 0, None   # the last frame drawn and of which scene
        self._reset_episode()
        self.image_pub = self.create_publisher(Image, p['camera_topic'], qos_profile_sensor_data)
        self.wrist_pub = self.create_publisher(Image, p['wrist_camera_topic'],
                                               qos_profile_sensor_data) if p['wrist_view_m'] else None
        self.joint_pub = self.create_publisher(JointState, p['joint_state_topic'], 10)
        msg_type = JointTrajectory if p['action_type'] == 'joint_trajectory' else Float64MultiArray
        self.action_sub = self.create_subscription(msg_type, p['action_topic'],
                                                   self._on_action, 10)
        self.reset_srv = self.create_service(Trigger, 'sim/reset', self._on_reset)
        self.evaluate_srv = self.create_service(Trigger, 'sim/evaluate', self._on_evaluate)
        self.actions_received = 0
        self._last_action_step = -math.inf
        self.control_timer = self.create_timer(1.0 / p['control_rate_hz'], self._on_control_tick)
        self.camera_timer = self.create_timer(1.0 / p['camera_rate_hz'], self._on_camera_tick)
        self.joint_timer = self.create_timer(1.0 / p['joint_state_rate_hz'], self._publish_joints)
        self.get_logger().info(
            f'cloth sim: {p["image_width_px"]}x{p["image_height_px"]} rgb8 on '
            f'{p["camera_topic"]!r} '
            + (f'and {p["wrist_camera_topic"]!r} (wrist, {p["wrist_view_m"]} m) '
               if p['wrist_view_m'] else '') +
            f'at {p["camera_rate_hz"]} Hz, control {p["control_rate_hz"]} Hz, actions '
            f'({p["action_type"]}) on {p["action_topic"]!r}, episode seed {self.task.seed}')

    def _declare_and_validate(self):
        values = {}
        for name, (default, descriptor) in PARAMETERS.items():
            try:
                values[name] = self.declare_parameter(name, default, descriptor).value
            except InvalidParameterTypeException as exc:
                raise ConfigError(f'sim_node parameter {name}: {exc}; give a '
                                  f'{type(default).__name__} like {default!r}') from None
            except InvalidParameterValueException as exc:
                raise ConfigError(f'sim_node parameter {name}: {exc}; the default is '
                                  f'{default!r}') from None
        if values['action_type'] not in ACTION_TYPES:
            raise ConfigError(f'sim_node parameter action_type={values["action_type"]!r} is '
                              f'unknown; use one of {", ".join(ACTION_TYPES)}')
        try:
            wrist = check_wrist_view_m(values['wrist_view_m'])
        except ConfigError as exc:
            raise ConfigError(f'sim_node parameter {exc}') from None
        for name in ('camera_topic', 'joint_state_topic', 'action_topic') + \
                (('wrist_camera_topic',) if wrist else ()):
            if not values[name].strip():
                raise ConfigError(f'sim_node parameter {name} is empty; give a topic name')
        return values

    # ------------------------------------------------------------ episode
    def _reset_episode(self):
        self._hold_logged = False
        self.task.reset(self._next_seed)
        self._scene_changes += 1
        self._next_seed += 1
        # Hold where the gripper is, open, until the first action arrives.
        self.target = self.task.state().astype(float)
        self.target[2] = 0.0

    def _on_reset(self, request, response):
        self._reset_episode()
        response.success = True
        response.message = str(self.task.seed)
        self.get_logger().info(f'episode reset, seed {self.task.seed}')
        return response

    def _on_evaluate(self, request, response):
        result = self.task.result().to_dict()
        result.update(seed=self.task.seed, tick=self.task.tick,
                      episode_ticks=self.task.config.episode_ticks, done=self.task.done)
        response.success = True
        response.message = json.dumps(result)
        return response

    # ------------------------------------------------------------ control
    def _on_action(self, msg):
        if isinstance(msg, JointTrajectory):
            if not msg.points:
                self._reject('JointTrajectory without points')
                return
            missing = [n for n in JOINT_NAMES if n not in msg.joint_names]
            positions = msg.points[0].positions
            if missing or len(positions) != len(msg.joint_names):
                self._reject(f'JointTrajectory joints {list(msg.joint_names)} with '
                             f'{len(positions)} positions; need {list(JOINT_NAMES)}')
                return
            target = [positions[list(msg.joint_names).index(n)] for n in JOINT_NAMES]
        else:
            if len(msg.data) != len(JOINT_NAMES):
                self._reject(f'Float64MultiArray of {len(msg.data)} values; need '
                             f'{len(JOINT_NAMES)} in order {list(JOINT_NAMES)}')
                return
            target = list(msg.data)
        target = np.asarray(target, float)
        if not np.all(np.isfinite(target)):
            self._reject(f'non-finite action {target.tolist()}')
            return
        if self._episode_over():
            return
        self.target = target
        self.actions_received += 1
        if self.params['step_on_action']:
            self._step()
            self._last_action_step = time.monotonic()
            self._publish_image()
            self._publish_joints()

    def _reject(self, what):
        self.get_logger().warning(f'ignored action on {self.params["action_topic"]!r}: {what}; '
                               'holding the last target', throttle_duration_sec=2.0)

    def _episode_over(self):
        """True (and logged once) when the episode's time is up and the cell holds."""
        if not (self.params['hold_after_episode'] and self.task.done):
            return False
        if not self._hold_logged:
            self._hold_logged = True
            self.get_logger().info(f'episode over after {self.task.tick} ticks: holding, actions '
                                   'ignored until sim/reset')
        return True

    def _on_control_tick(self):
        if self._episode_over():
            return
        # Tick 0: the episode's ticks start with its first action (which steps it to tick 1).
        # One and a half periods: an action a few ms late must not let the timer slip in an
        # extra step (the cloth would move on a tick the policy never saw).
        if self.params['step_on_action'] and (
                self.task.tick == 0 or
                time.monotonic() - self._last_action_step < 1.5 / self.params['control_rate_hz']):
            return  # the action stream is stepping the sim
        self._step()

    def _step(self):
        self.task.step(self.target)
        self._scene_changes += 1

    def _on_camera_tick(self):
        if self.params['step_on_action'] and \
                time.monotonic() - self._last_action_step < 1.0 / self.params['camera_rate_hz']:
            return  # a frame went out with the last step
        self._publish_image()

    def _publish_image(self):
        # The renderer is deterministic: a scene that has not moved since the last frame (between
        # episodes, while a fine-tuning runs) is not drawn again, only stamped anew. Rendering
        # was most of an idle `rko up --sim`'s CPU.
        if self._frame is None or self._frame[0] != self._scene_changes:
            self._frame = (self._scene_changes, self.task.render(),
                           self.task.render_wrist() if self.wrist_pub is not None else None)
        # Both cameras carry one stamp: they show the same instant of the scene.
        stamp = self.get_clock().now().to_msg()
        self.image_pub.publish(image_message(self._frame[1], stamp, self.params['camera_frame_id']))
        if self.wrist_pub is not None:
            self.wrist_pub.publish(image_message(self._frame[2], stamp,
                                                 self.params['wrist_camera_frame_id']))

    def _publish_joints(self):
        msg = JointState()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.name = list(JOINT_NAMES)
        msg.position = [float(v) for v in self.task.state()]
        self.joint_pub.publish(msg)


def main(args=None):
    try:
        with rclpy.init(args=args):
            try:
                node = SimNode()
            except ConfigError as exc:
                print(f'sim_node: error: {exc}', file=sys.stderr)
                return 2
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            spin(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
