"""`rko bench recorder`: real ROS 2 publishers in a child process, raw subscriptions here feeding
EpisodeRecorder, and an exact loss count from sequence numbers carried in `header.frame_id`.

Both sides use reliable, keep-all QoS: the design target is zero lost messages, and a reliable
keep-all writer slows the publisher down instead of discarding samples when the reader lags.
rclpy is imported inside the functions only (the episodes package must import without ROS).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rko_ros.errors import RkoError

TOPIC_PREFIX = '/rko_bench'
ACK_TIMEOUT_S = 60.0   # how long the publisher waits for the reader to acknowledge everything


def _qos():
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE,
                      depth=1)


def camera_topics(cameras):
    return [f'{TOPIC_PREFIX}/camera_{i}/image_raw' for i in range(cameras)]


def publish(seconds, cameras, size_px, rate_hz, joint_rate_hz):
    """Child process: publish images and joint states, print the per-topic counts as JSON."""
    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image, JointState

    rclpy.init()
    node = rclpy.create_node('rko_bench_publisher')
    height, width = size_px
    rng = np.random.default_rng(0)
    cams = []
    for topic in camera_topics(cameras):
        msg = Image(height=height, width=width, encoding='rgb8', step=width * 3)
        msg.data = rng.integers(0, 255, height * width * 3, dtype=np.uint8).tobytes()
        cams.append((topic, node.create_publisher(Image, topic, _qos()), msg))
    joint_topic = f'{TOPIC_PREFIX}/joint_states'
    joint_pub = node.create_publisher(JointState, joint_topic, _qos())
    joint_msg = JointState(name=['gripper_x', 'gripper_y', 'gripper_closed'])
    publishers = [p for _, p, _ in cams] + [joint_pub]
    deadline = time.monotonic() + 30.0
    while any(p.get_subscription_count() < 1 for p in publishers):
        rclpy.spin_once(node, timeout_sec=0.05)
        if time.monotonic() > deadline:
            print(json.dumps({'error': 'no subscriber matched within 30 s'}), flush=True)
            return 2
    # The reader side may match each writer a little after the writer side matched it: wait for
    # the recorder's go (it has seen every publisher) so the first samples are not discarded.
    sys.stdin.readline()
    time.sleep(0.2)
    sent = {topic: 0 for topic, _, _ in cams}
    sent[joint_topic] = 0
    start = time.monotonic()
    next_cam, next_joint = start, start
    cam_period, joint_period = 1.0 / rate_hz, 1.0 / joint_rate_hz
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        if now >= next_cam:
            stamp = node.get_clock().now().to_msg()
            for topic, pub, msg in cams:
                msg.header.stamp = stamp
                msg.header.frame_id = str(sent[topic])
                pub.publish(msg)
                sent[topic] += 1
            next_cam += cam_period
        if now >= next_joint:
            joint_msg.header.stamp = node.get_clock().now().to_msg()
            joint_msg.header.frame_id = str(sent[joint_topic])
            joint_msg.position = [float(sent[joint_topic]), 0.0, 0.0]
            joint_pub.publish(joint_msg)
            sent[joint_topic] += 1
            next_joint += joint_period
        wait = min(next_cam, next_joint) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    elapsed = time.monotonic() - start
    # A reader that lags (a busy machine) still has samples in flight: exiting now would lose
    # them, so wait until the reliable reader acknowledged every sample of every writer.
    from rclpy.duration import Duration
    acked = all(p.wait_for_all_acked(Duration(seconds=ACK_TIMEOUT_S)) for p in publishers)
    print(json.dumps({'sent': sent, 'elapsed_s': elapsed, 'acked': acked}), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


def frame_id_of(cdr):
    """header.frame_id of a serialized message whose first field is a std_msgs/Header, read
    without deserialising the (large) rest: 4-byte encapsulation, stamp (8), string length, text."""
    length = int.from_bytes(cdr[12:16], 'little')
    return cdr[16:16 + length - 1].decode()


def run_bench(seconds=60.0, cameras=3, size_px=(480, 640), rate_hz=30.0, joint_rate_hz=100.0,
              storage='mcap', queue_size=1024, out=None):
    import rclpy
    from sensor_msgs.msg import Image, JointState

    from rko_ros.episodes.bag import bag_topics
    from rko_ros.episodes.recorder import EpisodeRecorder

    work = Path(out) if out else Path(tempfile.mkdtemp(prefix='rko-bench-recorder-'))
    bag_dir = work / f'bench-{time.strftime("%Y%m%d-%H%M%S")}'
    recorder = EpisodeRecorder(bag_dir, storage=storage, queue_size=queue_size)
    topics = camera_topics(cameras)
    joint_topic = f'{TOPIC_PREFIX}/joint_states'
    for topic in topics:
        recorder.add_topic(topic, 'sensor_msgs/msg/Image')
    recorder.add_topic(joint_topic, 'sensor_msgs/msg/JointState')
    received = {t: set() for t in topics + [joint_topic]}

    rclpy.init()
    node = rclpy.create_node('rko_bench_recorder')

    def make_callback(topic):
        def callback(cdr):
            recorder.write(topic, time.time_ns(), cdr)
            received[topic].add(int(frame_id_of(cdr)))
        return callback

    subs = [node.create_subscription(Image, t, make_callback(t), _qos(), raw=True)
            for t in topics]
    subs.append(node.create_subscription(JointState, joint_topic, make_callback(joint_topic),
                                         _qos(), raw=True))
    code = ('import sys; from rko_ros.episodes.bench_recorder import publish; '
            f'sys.exit(publish({seconds!r}, {cameras!r}, {tuple(size_px)!r}, {rate_hz!r}, '
            f'{joint_rate_hz!r}))')
    child = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        while child.poll() is None and not all(node.count_publishers(t) for t in received):
            rclpy.spin_once(node, timeout_sec=0.05)
            if time.monotonic() - started > 60:
                child.kill()
                raise RkoError('bench publisher did not appear within 60 s; check that ROS 2 '
                               'discovery works on this machine (ROS_DOMAIN_ID, firewall)')
        for _ in range(10):  # let the subscriptions match the writers just discovered
            rclpy.spin_once(node, timeout_sec=0.02)
        try:
            child.stdin.write('go\n')
            child.stdin.close()
        except BrokenPipeError:  # the child failed; its report says why
            pass
        while child.poll() is None:
            rclpy.spin_once(node, timeout_sec=0.05)
        # Acknowledged samples may still wait in this process's reader queues: drain until quiet.
        quiet_until = time.monotonic() + 1.0
        while time.monotonic() < quiet_until:
            before = sum(len(v) for v in received.values())
            rclpy.spin_once(node, timeout_sec=0.05)
            if sum(len(v) for v in received.values()) != before:
                quiet_until = time.monotonic() + 1.0
    finally:
        wall_s = time.monotonic() - started
        for sub in subs:
            node.destroy_subscription(sub)
        node.destroy_node()
        rclpy.shutdown()
        stats = recorder.close()
    lines = child.stdout.read().strip().splitlines()
    if not lines:
        raise RkoError(f'bench publisher exited with code {child.returncode} and no report')
    report = json.loads(lines[-1])
    if 'error' in report:
        raise RkoError(f'bench publisher: {report["error"]}')
    sent = report['sent']
    total_sent = sum(sent.values())
    missing = {t: sent[t] - len(received[t]) for t in sent}
    in_bag = sum(n for _, n in bag_topics(bag_dir).values())
    result = {
        'sent': total_sent,
        'received': sum(len(v) for v in received.values()),
        'recorded': stats['recorded'],
        'in_bag': in_bag,
        'lost': total_sent - stats['recorded'],
        'lost_in_transport': sum(missing.values()),
        'dropped_by_recorder': stats['dropped'],
        'queue_max': stats['queue_max'],
        'mb_per_s': round(stats['bytes'] / report['elapsed_s'] / 1e6, 2),
        'publish_s': round(report['elapsed_s'], 2),
        'image_rate_hz': round(sent[topics[0]] / report['elapsed_s'], 2) if topics else None,
        'joint_rate_hz': round(sent[joint_topic] / report['elapsed_s'], 2),
        'wall_s': round(wall_s, 2),
        'cameras': cameras, 'size_px': list(size_px), 'storage': storage,
        'rmw': os.environ.get('RMW_IMPLEMENTATION', 'default'),
        'error': stats['error'],
        'acked': report.get('acked'),
        'missing_seq': {t: sorted(set(range(sent[t])) - received[t])[:10] for t in sent
                        if missing[t]},
        'bag': str(bag_dir) if out else None,
    }
    if not out:
        shutil.rmtree(work, ignore_errors=True)
    return result
