"""policy_node: runs the active model version at `control_rate_hz` and publishes one action a tick.

A thin shell over `rko_ros.ros.control.PolicyController`: subscriptions turn camera frames and
joint states into numpy arrays (sensor-data QoS, depth 1: only the newest frame matters), a thread
of its own (`control.TickThread`, steady-clock deadlines; `tick_source: ros_timer` for a ROS timer
that follows /clock) asks the controller for each tick's action, and inference runs on the
controller's worker thread, so a slow chunk never delays a tick. Services: `policy/enable`
(SetBool), `policy/reload` (newest version), `policy/rollback` (previous version): both load and
check the new model beside the running one and swap between two ticks; a broken file leaves the
old model running. `policy/status` (DiagnosticStatus) reports the version, latency, tick timing and
every refused tick by reason.
"""
import sys
import threading
import time

from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import SetBool, Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from rko_ros.errors import ConfigError, ModelFileError, RkoError
from rko_ros.ros.control import PolicyController, TickThread
from rko_ros.ros.image_conversion import to_model_input
from rko_ros.ros.params import (Param, declare_all, default_data_dir, flat_limits,
                                guarded_service, run_node)

GRIPPER_JOINTS = ['gripper_x', 'gripper_y', 'gripper_closed']

PARAMETERS = {
    'data_dir': Param('', 'data folder holding models/ (empty: $RKO_DATA_DIR or ./data)'),
    'model_version': Param('', 'version to load at start (empty: the active one, else the newest)'),
    'camera_topics': Param(['camera/image_raw'], 'camera topics, in the order of camera_names'),
    'camera_names': Param(['camera'], 'camera names, checked against the card camera order'),
    'image_transport': Param('raw', 'raw (sensor_msgs/Image) or compressed (CompressedImage)',
                             choices=('raw', 'compressed')),
    'image_resize': Param(False, 'resize frames to the card image size instead of refusing them'),
    'joint_state_topic': Param('joint_states', 'sensor_msgs/JointState topic'),
    'joint_names': Param(GRIPPER_JOINTS, 'state joints, in the card order'),
    'action_topic': Param('action', 'topic the action is published on'),
    'action_type': Param('joint_trajectory', 'joint_trajectory (remaining chunk, timestamped) or '
                         'float64_multi_array (one action)',
                         choices=('joint_trajectory', 'float64_multi_array')),
    'control_rate_hz': Param(10.0, 'control ticks per second; must equal the card rate',
                             range=(0.5, 1000.0)),
    'max_obs_age_s': Param(0.5, 'no action when a camera frame or joint state is older',
                           range=(0.001, 60.0)),
    'obs_age_from': Param('stamp', 'stamp: an input\'s age counts from its header stamp (capture '
                          'time; transport and queueing delays count too), receipt when unstamped; '
                          'receipt: from arrival only (for a sensor whose clock is not this one)',
                          choices=('stamp', 'receipt')),
    'action_limits': Param(Parameter.Type.DOUBLE_ARRAY,
                           'flat [low0, high0, low1, high1, ...] per action dim; unset: no limits'),
    'enabled': Param(True, 'act from the start (else hold until policy/enable true)'),
    'status_rate_hz': Param(2.0, 'rate of policy/status messages', range=(0.1, 100.0)),
    'inference_threads': Param(1, 'ONNX Runtime intra-op threads (0: its default, which on a '
                               'small CPU competes with the control tick)',
                               range=(0, 64)),
    'noise_scale': Param(1.0, 'scale of each chunk\'s initial diffusion noise: 1 samples the '
                         'trained action distribution; below 1 chunks start nearer its middle, '
                         'which also shifts which behaviour the policy picks (0: deterministic); '
                         'compare models at one scale, see README',
                         range=(0.0, 2.0)),
    'chunk_candidates': Param(1, 'draws per chunk: above 1 each chunk is sampled this many times '
                              'in one batched call and the one closest to what the chunk in hand '
                              'planned for the same instants is kept (coherent chunks: no switch '
                              'between behaviours halfway through a motion); the first chunk of an '
                              'episode is the first draw. Inference time grows with it (CPU: '
                              'rko bench inference --candidates times it); 1 = one draw',
                              range=(1, 32)),
    'tick_source': Param('thread', 'thread: control ticks on a thread of their own at steady-clock '
                         'deadlines (no missed tick, sub-ms median jitter measured on 2 cores); '
                         'ros_timer: a ROS timer in the '
                         'executor, which follows the ROS clock (use_sim_time with a simulator '
                         'publishing /clock) but waits for the executor (ms of delay)',
                         choices=('thread', 'ros_timer')),
    'cuda_graph': Param(True, 'on the CUDA provider, run each chunk as one captured CUDA graph '
                        '(batch 1, captured at load); when ONNX Runtime cannot capture a model '
                        'the node logs why and runs it without'),
}


class PolicyNode(Node):
    """Cameras + joint states in, one checked action per control tick out."""

    def __init__(self, **kwargs):
        super().__init__('policy_node', **kwargs)
        # A thread waiting for the GIL waits up to one switch interval (5 ms by default): too
        # long for a tick that must land within 2 ms while image callbacks run beside it.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.params = p = declare_all(self, PARAMETERS)
        if len(p['camera_topics']) != len(p['camera_names']):
            raise ConfigError(f'policy_node: camera_topics has {len(p["camera_topics"])} topics '
                              f'but camera_names has {len(p["camera_names"])} names; give one '
                              f'name per topic, in the card order')
        from rko_ros.policy.store import ModelStore
        self.store = ModelStore(p['data_dir'] or default_data_dir())
        self.action_limits = None
        self.image_hw = None
        self._swap_lock = threading.Lock()
        runtime = self._initial_runtime()
        self.controller = PolicyController(
            runtime, p['camera_names'], self._card_value(runtime, 'n_obs_steps', 2),
            self._card_value(runtime, 'n_action_steps', 8),
            self._card_value(runtime, 'horizon', 16), p['control_rate_hz'], p['max_obs_age_s'],
            action_limits=self.action_limits, log=self._log, noise_scale=p['noise_scale'],
            chunk_candidates=p['chunk_candidates'])
        self.controller.set_enabled(p['enabled'])
        if p['obs_age_from'] == 'stamp':
            self.controller.obs.age_basis = (' (age from the header stamp when set; obs_age_from: '
                                             'receipt if that sensor\'s clock is not this one)')

        self.obs_group = MutuallyExclusiveCallbackGroup()
        self.service_group = MutuallyExclusiveCallbackGroup()
        image_type = Image if p['image_transport'] == 'raw' else CompressedImage
        self.image_subs = [
            self.create_subscription(image_type, topic, self._image_callback(i),
                                     qos_profile_sensor_data, callback_group=self.obs_group)
            for i, topic in enumerate(p['camera_topics'])]
        self.joint_sub = self.create_subscription(JointState, p['joint_state_topic'],
                                                  self._on_joint_state, qos_profile_sensor_data,
                                                  callback_group=self.obs_group)
        self.action_type = JointTrajectory if p['action_type'] == 'joint_trajectory' \
            else Float64MultiArray
        self.action_pub = self.create_publisher(self.action_type, p['action_topic'], 10)
        self.status_pub = self.create_publisher(DiagnosticStatus, 'policy/status', 10)
        guarded_service(self, SetBool, 'policy/enable', self._on_enable,
                        callback_group=self.service_group)
        guarded_service(self, Trigger, 'policy/reload', self._on_reload,
                        callback_group=self.service_group)
        guarded_service(self, Trigger, 'policy/rollback', self._on_rollback,
                        callback_group=self.service_group)
        self.period_s = 1.0 / p['control_rate_hz']
        self.tick_timer = self.tick_thread = None
        if p['tick_source'] == 'ros_timer':
            self.tick_timer = self.create_timer(self.period_s, self._on_tick,
                                                callback_group=MutuallyExclusiveCallbackGroup())
        else:
            self.tick_thread = TickThread(p['control_rate_hz'], self._on_tick,
                                          on_error=self._on_tick_error).start()
        self.status_timer = self.create_timer(1.0 / p['status_rate_hz'], self._publish_status,
                                              callback_group=self.service_group)
        self.get_logger().info(
            f'policy {getattr(runtime, "version", None) or "(none loaded)"} at '
            f'{p["control_rate_hz"]} Hz, cameras {p["camera_topics"]} ({p["image_transport"]}), '
            f'actions ({p["action_type"]}) on {p["action_topic"]!r}')

    # ------------------------------------------------------------ model loading
    @staticmethod
    def _card_value(runtime, key, default):
        return int(runtime.card[key]) if runtime is not None else default

    def _initial_runtime(self):
        version = self.params['model_version'] or self.store.active_version() \
            or self.store.newest_version()
        if version is None:
            self.get_logger().warning(f'no model under {self.store.models_dir}: holding until '
                                      f'policy/reload finds one (run `rko train`)')
            return None
        try:
            return self._load(version)
        except ModelFileError as exc:
            raise ConfigError(f'policy_node cannot use model {version}: {exc}') from None

    def _load(self, version):
        """Load and check a version beside the running one; raises ModelFileError."""
        from rko_ros.policy.runtime import PolicyRuntime, choose_providers
        p = self.params
        runtime = None
        on_cuda = choose_providers()[:1] == ['CUDAExecutionProvider']
        if p['cuda_graph'] and on_cuda and p['chunk_candidates'] > 1:
            if not getattr(self, '_said_no_graph', False):
                self._said_no_graph = True
                self.get_logger().info(f'chunk_candidates={p["chunk_candidates"]}: batched '
                                       f'chunks run without a CUDA graph (it is captured at '
                                       f'batch 1)')
        elif p['cuda_graph'] and on_cuda:
            try:
                runtime = PolicyRuntime(self.store.version_dir(version), cuda_graph=True)
            except ModelFileError as exc:
                self.get_logger().warning(f'model {version}: no CUDA graph ({exc}); running it '
                                          f'on the CUDA provider without one')
        if runtime is None:
            runtime = PolicyRuntime(self.store.version_dir(version),
                                    intra_op_threads=p['inference_threads'])
        runtime.check_matches(camera_names=p['camera_names'], joint_names=p['joint_names'],
                              control_rate_hz=p['control_rate_hz'])
        limits = flat_limits('policy_node', p['action_limits'], runtime.action_dim)
        if hasattr(self, 'controller'):
            old = self.controller.runtime
            if old is not None and (runtime.horizon != old.horizon or
                                    runtime.card['n_obs_steps'] != old.card['n_obs_steps']):
                raise ModelFileError(f'model {version} has horizon {runtime.horizon} / '
                                     f'n_obs_steps {runtime.card["n_obs_steps"]}, the running one '
                                     f'{old.horizon} / {old.card["n_obs_steps"]}; restart the '
                                     f'node to change them')
        else:
            self.action_limits = limits
        self.image_hw = tuple(runtime.card['image_size_px'])
        self.action_names = list(runtime.card['action_names'])
        return runtime

    def _swap_to(self, version, what):
        with self._swap_lock:
            current = getattr(self.controller.runtime, 'version', None)
            try:
                runtime = self._load(version)
            except RkoError as exc:
                message = f'{what} to {version} failed, still running {current}: {exc}'
                self.get_logger().error(message)
                return False, message
            if self.controller.runtime is None:  # the first model: its card sets the shapes
                self.controller.reshape(runtime.card['n_obs_steps'],
                                        runtime.card['n_action_steps'], runtime.horizon)
            # The store first: once the status names the new version, so does `models/active`
            # (what trainer/start fine-tunes next).
            try:
                self.store.activate(version)
            except OSError as exc:
                message = (f'{what} to {version} failed, still running {current}: cannot mark it '
                           f'active: {exc}')
                self.get_logger().error(message)
                return False, message
            self.controller.swap_runtime(runtime)
            message = f'{what}: now running {version} (was {current})'
            self.get_logger().info(message)
            return True, message

    def _on_reload(self, request, response):
        version = self.store.newest_version()
        if version is None:
            response.success, response.message = False, (
                f'no model version under {self.store.models_dir}; train or fine-tune one first')
            return response
        response.success, response.message = self._swap_to(version, 'reload')
        return response

    def _on_rollback(self, request, response):
        current = getattr(self.controller.runtime, 'version', None)
        previous = self.store.previous_version(current) if current else None
        if previous is None:
            response.success, response.message = False, (
                f'no version before {current or "(none loaded)"} to roll back to; versions: '
                f'{self.store.versions()}')
            return response
        response.success, response.message = self._swap_to(previous, 'rollback')
        return response

    def _on_enable(self, request, response):
        self.controller.set_enabled(request.data)
        response.success = True
        response.message = 'acting' if request.data else 'holding: no actions published'
        self.get_logger().info(f'policy/enable {request.data}: {response.message}')
        return response

    # ------------------------------------------------------------ observations
    def _image_callback(self, index):
        camera = self.params['camera_topics'][index]

        def callback(msg):
            now_s = time.monotonic()
            if self.image_hw is None:  # no model loaded yet: nothing to size the frame for
                return
            try:
                chw = to_model_input(msg, self.image_hw, self.params['image_resize'], camera)
            except RkoError as exc:
                self.controller.obs.set_image_error(index, str(exc), now_s)
                return
            self.controller.obs.set_image(index, chw, self._captured_s(msg.header, now_s))
        return callback

    def _captured_s(self, header, now_s):
        """Monotonic time of capture: arrival minus the delay its header stamp shows.

        A frame that sat in a DDS queue while this process was starved is as old as its stamp says,
        not as fresh as its late arrival: acting on it would act on the past.
        """
        stamp_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        if self.params['obs_age_from'] != 'stamp' or stamp_ns == 0:
            return now_s
        delay_s = (self.get_clock().now().nanoseconds - stamp_ns) * 1e-9
        return now_s - max(0.0, delay_s)

    def _on_joint_state(self, msg):
        now_s = time.monotonic()
        names = list(msg.name)
        wanted = self.params['joint_names']
        missing = [n for n in wanted if n not in names]
        if missing or len(msg.position) != len(names):
            self.controller.obs.set_state(None, now_s, error=(
                f'joint state on {self.params["joint_state_topic"]!r} lacks '
                f'{missing or "positions"}'
                f' (has {names}); the model needs {wanted}'))
            return
        self.controller.obs.set_state([msg.position[names.index(n)] for n in wanted],
                                      self._captured_s(msg.header, now_s))

    # ------------------------------------------------------------ control
    def _on_tick(self):
        try:
            action, remaining = self.controller.tick()
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the other nodes
            self.get_logger().error(f'control tick failed, no action: {type(exc).__name__}: '
                                    f'{exc}', throttle_duration_sec=5.0)
            return
        if action is None:
            return
        if self.action_type is JointTrajectory:
            msg = JointTrajectory()
            msg.header.stamp = self.get_clock().now().to_msg()
            msg.joint_names = self.action_names
            for i, step in enumerate(remaining):
                t_ns = int(round(i * self.period_s * 1e9))
                msg.points.append(JointTrajectoryPoint(
                    positions=[float(v) for v in step],
                    time_from_start=Duration(sec=t_ns // 1_000_000_000,
                                             nanosec=t_ns % 1_000_000_000)))
        else:
            msg = Float64MultiArray(data=[float(v) for v in action])
        self.action_pub.publish(msg)

    def _on_tick_error(self, exc):
        self.get_logger().error(f'control tick failed: {type(exc).__name__}: {exc}',
                                throttle_duration_sec=5.0)

    def _log(self, level, text):
        # rclpy ties a severity to each logging call site: one call per severity.
        if level == 'warn':
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)

    def status_dict(self):
        return self.controller.status()

    def _publish_status(self):
        status = self.status_dict()
        refused = status.pop('refused')
        msg = DiagnosticStatus(name='rko/policy', hardware_id=str(status['model_version']))
        acting = status['enabled'] and status['model_version'] is not None
        msg.level = DiagnosticStatus.OK if acting else DiagnosticStatus.WARN
        msg.message = (f'running {status["model_version"]}' if acting else
                       'holding (disabled)' if not status['enabled'] else 'no model loaded')
        values = {**status, **{f'refused_{k}': v for k, v in refused.items()}}
        msg.values = [KeyValue(key=k, value='' if v is None else str(v)) for k, v in values.items()]
        self.status_pub.publish(msg)

    def close(self):
        if self.tick_thread is not None:
            self.tick_thread.stop()
        self.controller.close()


def main(args=None):
    return run_node(PolicyNode, args=args)


if __name__ == '__main__':
    sys.exit(main())
