"""Single nodes in their own processes: episode timeout, and a policy node that starts without a
model, takes compressed frames and acts once `policy/reload` finds the first version."""
import array
import json
import time

import cv2
import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy._rclpy_pybind11 import RCLError
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from rko_ros.episodes.catalog import Catalog
from rko_ros.ros.params import spin
from ros_testing import Client, NodeProcess, add_version, status_values


def test_episode_stops_itself_at_max_episode_s(tmp_path):
    ns = 'rko_timeout'
    proc = NodeProcess.module('rko_ros.ros.episode_node', {
        'data_dir': str(tmp_path), 'max_episode_s': 0.5, 'storage': 'sqlite3'},
        tmp_path / 'episode.log', namespace=ns)
    client = Client('timeout_client')
    try:
        start = client.call(Trigger, f'/{ns}/episode/start')
        assert start.success and start.message == 'ep000001'
        time.sleep(1.2)
        stop = client.call(Trigger, f'/{ns}/episode/stop')
        assert not stop.success and stop.message.startswith('no episode is recording')
        with Catalog(tmp_path) as catalog:
            entry = catalog.get('ep000001')
        assert entry['complete'] and 0.5 <= entry['duration_s'] < 1.2
        assert json.loads(entry['note'])['stopped_by'] == 'timeout'
        assert (tmp_path / 'episodes' / 'ep000001' / 'metadata.yaml').is_file()
    finally:
        client.close()
        assert proc.stop() == 0, proc.output()


@pytest.mark.parametrize('tick_source', ['thread', 'ros_timer'])
def test_policy_without_a_model_holds_until_reload_then_acts_on_jpeg(tmp_path, tick_source):
    ns = f'rko_cold_{tick_source}'
    proc = NodeProcess.module('rko_ros.ros.policy_node', {
        'data_dir': str(tmp_path), 'image_transport': 'compressed', 'image_resize': True,
        'status_rate_hz': 10.0, 'action_type': 'float64_multi_array', 'tick_source': tick_source},
        tmp_path / 'policy.log', namespace=ns)
    client = Client('cold_client')
    client.subscribe(Float64MultiArray, f'/{ns}/action')
    client.subscribe(DiagnosticStatus, f'/{ns}/policy/status')
    # A 64x48 jpeg camera; the model wants 32x32: image_resize lets the node scale it.
    ok, jpeg = cv2.imencode('.jpg', np.full((48, 64, 3), 90, np.uint8))
    frame = CompressedImage(format='jpeg')
    frame.data = array.array('B', jpeg.tobytes())
    image_pub = client.node.create_publisher(CompressedImage, f'/{ns}/camera/image_raw',
                                             qos_profile_sensor_data)
    joint_pub = client.node.create_publisher(JointState, f'/{ns}/joint_states',
                                             qos_profile_sensor_data)

    def publish():
        image_pub.publish(frame)
        joint_pub.publish(JointState(name=['gripper_x', 'gripper_y', 'gripper_closed'],
                                     position=[0.0, 0.0, 0.0]))
    client.node.create_timer(0.05, publish)
    try:
        status = client.wait_for(lambda: client.messages(f'/{ns}/policy/status'), 30, 'status')
        assert status[-1][1].message == 'no model loaded'
        reload = client.call(Trigger, f'/{ns}/policy/reload')
        assert not reload.success and 'no model version under' in reload.message
        time.sleep(0.5)
        assert not client.messages(f'/{ns}/action')
        version = add_version(tmp_path)
        reload = client.call(Trigger, f'/{ns}/policy/reload')
        assert reload.success and reload.message == f'reload: now running {version} (was None)'
        client.wait_for(lambda: len(client.messages(f'/{ns}/action')) >= 5, 10, 'actions')
        actions = client.messages(f'/{ns}/action')
        assert all(len(m.data) == 3 and np.all(np.isfinite(m.data)) for _, m in actions)
        since = time.monotonic()
        values = status_values(client.wait_for(
            lambda: client.messages(f'/{ns}/policy/status', since), 5, 'status')[-1][1])
        assert values['model_version'] == version and values.get('refused_bad_input') is None
    finally:
        client.close()
        assert proc.stop() == 0, proc.output()


class _WaitSetFails(SingleThreadedExecutor):
    """A real executor whose spin fails the way rclpy's does when a signal shuts the context down
    between its shutdown check and the next wait set."""

    def spin(self):
        raise RCLError('failed to initialize wait set: the given context is not valid')


def test_spin_treats_a_wait_set_failure_after_shutdown_as_the_shutdown():
    context = rclpy.Context()
    context.init()
    executor = _WaitSetFails(context=context)
    try:
        with pytest.raises(RCLError):      # context still valid: a real failure, raised
            spin(executor)
    finally:
        context.shutdown()
    assert spin(executor) is None           # context shut down: that is the shutdown
