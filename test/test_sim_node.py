"""sim_node over real rclpy: it publishes camera images and joint states, executes actions like
a robot controller (both message types), resets and evaluates episodes, refuses bad parameters."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from rko_ros.errors import ConfigError
from rko_ros.ros.sim_node import SimNode

HOME_XY = (0.0, -0.24)


class Probe:
    """The other side of the wire: a node that listens, commands and calls services."""

    def __init__(self, context, sim_params, action_type=JointTrajectory):
        overrides = [Parameter(k, value=v) for k, v in sim_params.items()]
        self.sim = SimNode(context=context, parameter_overrides=overrides)
        self.node = rclpy.create_node('probe', context=context)
        self.images, self.joints = [], []
        self.node.create_subscription(Image, 'camera/image_raw', self.images.append,
                                      qos_profile_sensor_data)
        self.node.create_subscription(JointState, 'joint_states', self.joints.append, 10)
        self.action_pub = self.node.create_publisher(action_type, 'action', 10)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.sim)
        self.executor.add_node(self.node)

    def spin_until(self, condition, timeout_s=5.0):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not condition():
            self.executor.spin_once(timeout_sec=0.02)
        return condition()

    def gripper(self):
        return np.array(self.joints[-1].position)

    def call(self, service):
        client = self.node.create_client(Trigger, service)
        assert self.spin_until(lambda: client.service_is_ready(), 5.0), service
        future = client.call_async(Trigger.Request())
        assert self.spin_until(future.done, 5.0), service
        return future.result()

    def send(self, msg):
        assert self.spin_until(lambda: self.action_pub.get_subscription_count() > 0)
        self.action_pub.publish(msg)

    def close(self):
        self.executor.shutdown()
        self.sim.destroy_node()
        self.node.destroy_node()


def _trajectory(names, positions):
    msg = JointTrajectory()
    msg.joint_names = list(names)
    msg.points = [JointTrajectoryPoint(positions=[float(p) for p in positions])]
    return msg


def test_publishes_camera_and_executes_trajectory_actions(context):
    probe = Probe(context, {'control_rate_hz': 20.0, 'camera_rate_hz': 20.0,
                            'joint_state_rate_hz': 50.0, 'seed': 4})
    try:
        assert probe.spin_until(lambda: len(probe.images) >= 3 and probe.joints)
        image = probe.images[-1]
        assert (image.height, image.width, image.encoding, image.step) == (64, 64, 'rgb8', 192)
        pixels = np.frombuffer(bytes(image.data), np.uint8).reshape(64, 64, 3)
        assert pixels.std() > 10          # a cloth on a table, not a blank frame
        assert list(probe.joints[-1].name) == ['gripper_x', 'gripper_y', 'gripper_closed']
        assert np.allclose(probe.gripper(), [*HOME_XY, 0.0], atol=1e-6)

        # No action yet: the controller holds the gripper where it is.
        probe.spin_until(lambda: False, 0.3)
        assert np.allclose(probe.gripper(), [*HOME_XY, 0.0], atol=1e-6)

        # Joint names in another order than the joint state's: matched by name.
        probe.send(_trajectory(['gripper_closed', 'gripper_y', 'gripper_x'], [0.0, -0.1, 0.1]))
        assert probe.spin_until(lambda: np.allclose(probe.gripper()[:2], [0.1, -0.1], atol=1e-3))
        assert probe.sim.actions_received == 1
        moved_image = np.frombuffer(bytes(probe.images[-1].data), np.uint8).reshape(64, 64, 3)
        assert np.abs(moved_image.astype(int) - pixels.astype(int)).sum() > 0

        # A message missing a joint is refused; the last target is held.
        probe.send(_trajectory(['gripper_x', 'gripper_y'], [0.2, 0.2]))
        probe.spin_until(lambda: False, 0.3)
        assert np.allclose(probe.gripper()[:2], [0.1, -0.1], atol=1e-3)
        assert probe.sim.actions_received == 1

        result = json.loads(probe.call('sim/evaluate').message)
        assert result['style'] == 'none' and result['success'] is False
        assert result['seed'] == 4 and result['tick'] > 5 and 0.0 <= result['quality'] <= 1.0

        reply = probe.call('sim/reset')
        assert reply.success and reply.message == '5'
        assert probe.spin_until(lambda: np.allclose(probe.gripper(), [*HOME_XY, 0.0], atol=1e-6))
        assert json.loads(probe.call('sim/evaluate').message)['tick'] < 10
        # Frames of an unchanged scene are drawn once and stamped anew: after the reset they
        # show the new cloth, exactly as rendered, not the last frame of the old one.
        n = len(probe.images)
        assert probe.spin_until(lambda: len(probe.images) >= n + 2)
        frames = [np.frombuffer(bytes(m.data), np.uint8).reshape(64, 64, 3)
                  for m in probe.images[-2:]]
        np.testing.assert_array_equal(frames[-1], probe.sim.task.render())
        np.testing.assert_array_equal(frames[0], frames[1])
        assert np.abs(frames[-1].astype(int) - moved_image.astype(int)).sum() > 0
        stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in probe.images[-2:]]
        assert stamps[1] > stamps[0]
    finally:
        probe.close()


def test_float64_multi_array_actions_grasp_and_lift(context):
    probe = Probe(context, {'control_rate_hz': 20.0, 'action_type': 'float64_multi_array',
                            'image_width_px': 96, 'image_height_px': 72},
                  action_type=Float64MultiArray)
    try:
        assert probe.spin_until(lambda: probe.images and probe.joints)
        assert (probe.images[-1].width, probe.images[-1].height) == (96, 72)
        corner = probe.sim.task.sim.x[0, :2]
        probe.send(Float64MultiArray(data=[corner[0], corner[1], 0.0]))
        assert probe.spin_until(lambda: np.allclose(probe.gripper()[:2], corner, atol=1e-3))
        probe.send(Float64MultiArray(data=[0.0, 0.0]))   # wrong length: refused
        probe.send(Float64MultiArray(data=[corner[0], corner[1], 1.0]))
        assert probe.spin_until(lambda: probe.gripper()[2] == 1.0)
        sim = probe.sim.task.sim
        assert sim.grasped == 0
        assert probe.spin_until(lambda: sim.x[0, 2] > 0.05)
        assert probe.sim.actions_received == 2
    finally:
        probe.close()


def test_step_on_action_gives_the_offline_observe_act_timing(context):
    """Each action advances exactly one tick, and its joint state and frame go out at once: the
    state after action k is the offline task's, as in the demonstrations (step_on_action)."""
    probe = Probe(context, {'control_rate_hz': 1.0, 'camera_rate_hz': 1.0,
                            'joint_state_rate_hz': 1.0})
    try:
        assert probe.spin_until(lambda: probe.images and probe.joints)
        for k in range(3):
            tick0 = probe.sim.task.tick
            n_joints, n_images = len(probe.joints), len(probe.images)
            probe.send(_trajectory(['gripper_x', 'gripper_y', 'gripper_closed'],
                                   [0.0, -0.2 + 0.01 * k, 0.0]))
            # Well inside the 1 s timer period: the step and both messages came with the action.
            assert probe.spin_until(lambda: probe.sim.actions_received == k + 1 and
                                    len(probe.joints) > n_joints and
                                    len(probe.images) > n_images, 0.3)
            assert probe.sim.task.tick == tick0 + 1
            assert np.allclose(probe.joints[-1].position, probe.sim.task.state(), atol=1e-6)
        assert probe.joints[-1].position[1] > -0.24 + 1e-4   # moving toward the targets
    finally:
        probe.close()


def test_an_episode_clock_starts_with_its_first_action(context):
    """The service calls that start an episode (reset, recorder, enable) and the policy's first
    inference take no ticks from it: the cloth waits for the first action, as offline; frames
    still go out meanwhile (the policy needs them), and once started the timer keeps time."""
    probe = Probe(context, {'control_rate_hz': 20.0, 'camera_rate_hz': 20.0,
                            'joint_state_rate_hz': 20.0})
    try:
        assert probe.call('sim/reset').success
        n_images = len(probe.images)
        probe.spin_until(lambda: False, 0.4)            # eight control periods, no action
        assert probe.sim.task.tick == 0
        assert len(probe.images) >= n_images + 4
        probe.send(_trajectory(['gripper_x', 'gripper_y', 'gripper_closed'], [0.0, -0.2, 0.0]))
        assert probe.spin_until(lambda: probe.sim.actions_received == 1, 1.0)
        assert probe.sim.task.tick >= 1
        assert probe.spin_until(lambda: probe.sim.task.tick >= 4, 1.0)   # the timer holds it
        assert probe.call('sim/reset').success and probe.sim.task.tick == 0
        probe.spin_until(lambda: False, 0.3)
        assert probe.sim.task.tick == 0                 # waiting again for the new episode
    finally:
        probe.close()


def test_the_cell_holds_after_the_episode_ends(context):
    """Past episode_ticks actions are ignored (the demonstrations end there; judging the cloth
    after extra, unplanned moves would grade what the policy was never asked to do)."""
    probe = Probe(context, {'control_rate_hz': 1.0, 'camera_rate_hz': 1.0,
                            'joint_state_rate_hz': 1.0, 'episode_ticks': 3})
    try:
        assert probe.spin_until(lambda: probe.images and probe.joints)
        tick0 = probe.sim.task.tick       # the 1 Hz timer may have stepped once before actions
        for k in range(5):
            probe.send(_trajectory(['gripper_x', 'gripper_y', 'gripper_closed'],
                                   [0.0, -0.2 + 0.02 * k, 0.0]))
            probe.spin_until(lambda: False, 0.1)
        result = json.loads(probe.call('sim/evaluate').message)
        assert result['done'] and result['tick'] == 3
        assert probe.sim.actions_received == 3 - tick0     # the ones after the end are ignored
        held = probe.sim.task.sim.x.copy()
        probe.spin_until(lambda: False, 1.2)     # the control timer does not step it either
        assert probe.sim.task.tick == 3 and np.array_equal(probe.sim.task.sim.x, held)
        assert probe.call('sim/reset').success and probe.sim.task.tick == 0
        probe.send(_trajectory(['gripper_x', 'gripper_y', 'gripper_closed'], [0.0, -0.2, 0.0]))
        assert probe.spin_until(lambda: probe.sim.actions_received == 4 - tick0, 0.5)
    finally:
        probe.close()


def test_wrist_camera_follows_the_gripper_with_the_scene_cameras_stamp(context):
    probe = Probe(context, {'control_rate_hz': 20.0, 'camera_rate_hz': 20.0,
                            'image_width_px': 48, 'image_height_px': 48, 'wrist_view_m': 0.15,
                            'seed': 4})
    wrist = []
    probe.node.create_subscription(Image, 'wrist_camera/image_raw', wrist.append,
                                   qos_profile_sensor_data)
    try:
        assert probe.spin_until(lambda: len(wrist) >= 2 and len(probe.images) >= 2 and probe.joints)

        def pixels(msg):
            return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
        home = pixels(wrist[-1])
        assert home.shape == (48, 48, 3)
        np.testing.assert_array_equal(home, probe.sim.task.render_wrist())
        # Over the table's edge below the cloth at home, and the scene camera sees otherwise.
        assert np.abs(home.astype(int) - pixels(probe.images[-1]).astype(int)).sum() > 0
        stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in probe.images}
        assert (wrist[-1].header.stamp.sec, wrist[-1].header.stamp.nanosec) in stamps
        assert wrist[-1].header.frame_id == 'sim_wrist_camera'
        # Over the cloth's left edge the wrist image is mostly cloth; it moved with the gripper.
        probe.send(_trajectory(['gripper_x', 'gripper_y', 'gripper_closed'], [-0.15, 0.0, 0.0]))
        assert probe.spin_until(lambda: np.allclose(probe.gripper()[:2], [-0.15, 0.0], atol=1e-3))
        n = len(wrist)
        assert probe.spin_until(lambda: len(wrist) >= n + 2)
        over_edge = pixels(wrist[-1])
        np.testing.assert_array_equal(over_edge, probe.sim.task.render_wrist())
        blue = lambda img: float(((img[..., 2] > img[..., 0] + 40)).mean())   # the cloth's front
        assert blue(home) < 0.05 and 0.2 < blue(over_edge) < 0.8
    finally:
        probe.close()


@pytest.mark.parametrize('name, value, expected', [
    ('action_type', 'bogus', 'action_type'),
    ('control_rate_hz', 1000.0, 'control_rate_hz'),
    ('control_rate_hz', 10, 'give a float'),
    ('camera_topic', ' ', 'camera_topic'),
    ('camera_view_m', 0.05, 'camera_view_m'),
    ('wrist_view_m', 0.05, 'wrist_view_m'),
])
def test_bad_parameters_stop_the_node(context, name, value, expected):
    with pytest.raises(ConfigError, match=expected):
        SimNode(context=context, parameter_overrides=[Parameter(name, value=value)])


def test_main_exits_with_message_on_bad_parameter():
    proc = subprocess.run(
        [sys.executable, '-m', 'rko_ros.ros.sim_node', '--ros-args', '-p', 'image_width_px:=2'],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert 'image_width_px' in proc.stderr and 'Traceback' not in proc.stderr
