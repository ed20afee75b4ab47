"""episode_node: records episodes to rosbag2 and takes the operator's feedback on them.

`episode/start` opens a catalog entry and a bag (`data_dir/episodes/<id>`), `episode/stop` (or the
`max_episode_s` timeout) closes both; while recording, raw (still serialized) subscriptions to the
cameras, joint states, the action and policy/status go straight to `EpisodeRecorder`, so recording
costs no deserialization. Feedback: `feedback/label_last` (SetBool: true = desirable),
`feedback/prefer_last` (SetBool: true = the last episode is preferred over the one before it),
`feedback/undo` (Trigger). A call at the wrong moment (stop before start, label with nothing
finished) answers success=false with what to do instead. A thin shell over `EpisodeRecorder` and
`Catalog` (rko_ros.episodes).
"""
import json
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import SetBool, Trigger
from trajectory_msgs.msg import JointTrajectory

from rko_ros.errors import RkoError
from rko_ros.ros.params import Param, declare_all, default_data_dir, guarded_service, run_node

PARAMETERS = {
    'data_dir': Param('', 'data folder for episodes/ and catalog.sqlite (empty: $RKO_DATA_DIR or '
                      './data)'),
    'camera_topics': Param(['camera/image_raw'], 'camera topics to record'),
    'image_transport': Param('raw', 'raw (Image) or compressed (CompressedImage)',
                             choices=('raw', 'compressed')),
    'joint_state_topic': Param('joint_states', 'sensor_msgs/JointState topic to record'),
    'action_topic': Param('action', 'action topic to record'),
    'action_type': Param('joint_trajectory', 'joint_trajectory or float64_multi_array',
                         choices=('joint_trajectory', 'float64_multi_array')),
    'record_policy_status': Param(True, 'also record policy/status'),
    'storage': Param('mcap', 'bag storage: mcap or sqlite3', choices=('mcap', 'sqlite3')),
    'max_episode_s': Param(300.0, 'an episode still recording after this long is stopped',
                           range=(0.1, 86400.0)),
    'queue_size': Param(4096, 'messages the recorder may hold before it drops',
                        range=(16, 1000000)),
}

MSGTYPES = {Image: 'sensor_msgs/msg/Image', CompressedImage: 'sensor_msgs/msg/CompressedImage',
            JointState: 'sensor_msgs/msg/JointState',
            JointTrajectory: 'trajectory_msgs/msg/JointTrajectory',
            Float64MultiArray: 'std_msgs/msg/Float64MultiArray',
            DiagnosticStatus: 'diagnostic_msgs/msg/DiagnosticStatus'}


class EpisodeNode(Node):
    def __init__(self, **kwargs):
        super().__init__('episode_node', **kwargs)
        self.params = p = declare_all(self, PARAMETERS)
        from rko_ros.episodes.catalog import Catalog
        from rko_ros.policy.store import ModelStore
        self.data_dir = p['data_dir'] or default_data_dir()
        self.catalog = Catalog(self.data_dir)
        self.store = ModelStore(self.data_dir)
        self._lock = threading.Lock()
        self.recorder = None
        self.episode_id = None
        self.started_s = None
        self.last_finished = []   # this node's finished episodes, newest last

        image_type = Image if p['image_transport'] == 'raw' else CompressedImage
        action_type = JointTrajectory if p['action_type'] == 'joint_trajectory' \
            else Float64MultiArray
        topics = [(image_type, t, qos_profile_sensor_data) for t in p['camera_topics']]
        topics += [(JointState, p['joint_state_topic'], qos_profile_sensor_data),
                   (action_type, p['action_topic'], 10)]
        if p['record_policy_status']:
            topics.append((DiagnosticStatus, 'policy/status', 10))
        self.record_group = MutuallyExclusiveCallbackGroup()
        self.subs = []
        # The newest camera frame and joint state seen before an episode starts open its bag: the
        # policy's first tick acted on them, so the first tick has its observation in the data.
        self._latest = {}
        observations = {self.resolve_topic_name(t) for t in p['camera_topics']} | \
            {self.resolve_topic_name(p['joint_state_topic'])}
        for msg_type, topic, qos in topics:
            # Bags name topics fully resolved, as `ros2 bag record` does.
            resolved = self.resolve_topic_name(topic)
            self.create_subscription(msg_type, topic,
                                     self._writer(resolved, resolved in observations), qos,
                                     raw=True, callback_group=self.record_group)
            self.subs.append((resolved, MSGTYPES[msg_type]))
        services = MutuallyExclusiveCallbackGroup()
        guarded_service(self, Trigger, 'episode/start', self._on_start, callback_group=services)
        guarded_service(self, Trigger, 'episode/stop', self._on_stop, callback_group=services)
        guarded_service(self, SetBool, 'feedback/label_last', self._on_label,
                        callback_group=services)
        guarded_service(self, SetBool, 'feedback/prefer_last', self._on_prefer,
                        callback_group=services)
        guarded_service(self, Trigger, 'feedback/undo', self._on_undo, callback_group=services)
        self.timeout_timer = self.create_timer(0.1, self._check_timeout, callback_group=services)
        self.get_logger().info(f'episodes under {self.data_dir}; recording '
                               f'{[t for t, _ in self.subs]}')

    def _writer(self, topic, keep_latest):
        def write(serialized):
            now_ns = self.get_clock().now().nanoseconds
            with self._lock:
                if keep_latest:
                    self._latest[topic] = (now_ns, serialized)
                if self.recorder is not None:
                    self.recorder.write(topic, now_ns, bytes(serialized))
        return write

    # ------------------------------------------------------------ episodes
    def start_episode(self):
        from rko_ros.episodes.recorder import EpisodeRecorder
        if self.episode_id is not None:
            return False, (f'episode {self.episode_id} is still recording; call episode/stop '
                           f'first')
        episode_id = self.catalog.start_episode(
            self.store.active_version(), meta={'topics': dict(self.subs)})
        try:
            recorder = EpisodeRecorder(self.catalog.bag_path(episode_id),
                                       storage=self.params['storage'],
                                       queue_size=self.params['queue_size'])
            for topic, msgtype in self.subs:
                recorder.add_topic(topic, msgtype)
        except RkoError as exc:
            self.catalog.finish_episode(episode_id, complete=False, note=str(exc))
            return False, f'cannot record episode {episode_id}: {exc}'
        with self._lock:
            for topic, (stamp_ns, serialized) in sorted(self._latest.items()):
                recorder.write(topic, stamp_ns, bytes(serialized))
            self.recorder, self.episode_id = recorder, episode_id
        self.started_s = time.monotonic()
        self.get_logger().info(f'episode {episode_id} recording')
        return True, episode_id

    def stop_episode(self, why='episode/stop'):
        if self.episode_id is None:
            return False, 'no episode is recording; call episode/start first'
        with self._lock:
            recorder, episode_id = self.recorder, self.episode_id
            self.recorder = self.episode_id = None
        stats = recorder.close()
        complete = bool(stats.get('complete'))
        note = json.dumps({'stopped_by': why, 'recorded': stats['recorded'],
                           'dropped': stats['dropped'], 'error': stats.get('error')})
        self.catalog.finish_episode(episode_id, complete=complete, note=note)
        if complete:
            self.last_finished.append(episode_id)
        self.get_logger().info(f'episode {episode_id} stopped ({why}): {stats["recorded"]} '
                               f'messages, {stats["dropped"]} dropped')
        return complete, episode_id if complete else (
            f'episode {episode_id} is incomplete: {stats.get("error")}')

    def _check_timeout(self):
        if self.episode_id is not None and \
                time.monotonic() - self.started_s > self.params['max_episode_s']:
            self.get_logger().warning(f'episode {self.episode_id} reached max_episode_s '
                                      f'{self.params["max_episode_s"]}; stopping it')
            self.stop_episode(why='timeout')

    def _on_start(self, request, response):
        response.success, response.message = self.start_episode()
        return response

    def _on_stop(self, request, response):
        response.success, response.message = self.stop_episode()
        return response

    # ------------------------------------------------------------ feedback
    def _finished(self):
        """Complete episodes, newest last (this node's, else the catalog's)."""
        if self.last_finished:
            return list(self.last_finished)
        return [e['id'] for e in self.catalog.list(status='complete')]

    def _on_label(self, request, response):
        finished = self._finished()
        if self.episode_id is not None:
            response.success, response.message = False, (
                f'episode {self.episode_id} is still recording; call episode/stop, then label it')
        elif not finished:
            response.success, response.message = False, (
                'no finished episode to label; record one with episode/start and episode/stop')
        else:
            episode_id = finished[-1]
            try:
                self.catalog.label(episode_id, bool(request.data), source='operator')
                response.success = True
                response.message = f'{episode_id} labelled ' + \
                    ('desirable' if request.data else 'undesirable')
            except RkoError as exc:
                response.success, response.message = False, str(exc)
        self._log_feedback('label_last', response)
        return response

    def _on_prefer(self, request, response):
        finished = self._finished()
        if self.episode_id is not None:
            response.success, response.message = False, (
                f'episode {self.episode_id} is still recording; call episode/stop first')
        elif len(finished) < 2:
            response.success, response.message = False, (
                f'a preference needs two finished episodes, there is {len(finished)}; record '
                f'another one first')
        else:
            last, previous = finished[-1], finished[-2]
            winner, loser = (last, previous) if request.data else (previous, last)
            try:
                self.catalog.prefer(winner, loser, source='operator')
                response.success, response.message = True, f'{winner} preferred over {loser}'
            except RkoError as exc:
                response.success, response.message = False, str(exc)
        self._log_feedback('prefer_last', response)
        return response

    def _on_undo(self, request, response):
        undone = self.catalog.undo_last_label(source=None)
        if undone is None:
            response.success, response.message = False, 'nothing to undo: no active label'
        else:
            response.success = True
            response.message = f'undid {undone["kind"]} ' + (
                f'of {undone["episode_id"]}' if undone['kind'] == 'label' else
                f'{undone["winner_id"]} over {undone["loser_id"]}')
        self._log_feedback('undo', response)
        return response

    def _log_feedback(self, what, response):
        # rclpy ties a severity to each logging call site: one call per severity.
        if response.success:
            self.get_logger().info(f'feedback/{what}: {response.message}')
        else:
            self.get_logger().warning(f'feedback/{what}: {response.message}')

    def close(self):
        if self.episode_id is not None:
            self.stop_episode(why='shutdown')
        self.catalog.close()


def main(args=None):
    return run_node(EpisodeNode, args=args)


if __name__ == '__main__':
    import sys
    sys.exit(main())
