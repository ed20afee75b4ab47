"""EpisodeRecorder: real rosbag2 bags read back by rosbags and by the mcap library, crash and
disk-full behaviour in real child processes."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rko_ros.episodes import bag
from rko_ros.episodes.recorder import EpisodeRecorder
from rko_ros.episodes.synthetic import image_cdr, joint_state_cdr, trajectory_cdr
from rko_ros.errors import EpisodeError

NAMES = ('gripper_x', 'gripper_y', 'gripper_closed')


def _messages(count=30, image_hw=(12, 16)):
    """Interleaved camera / joint / action messages with distinct payloads."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(count):
        stamp = 1_000_000_000 + k * 100_000_000
        out.append(('camera/image_raw', 'sensor_msgs/msg/Image', stamp,
                    image_cdr(rng.integers(0, 255, (*image_hw, 3), dtype=np.uint8), stamp)))
        out.append(('joint_states', 'sensor_msgs/msg/JointState', stamp,
                    joint_state_cdr(NAMES, rng.normal(size=3), stamp)))
        out.append(('action', 'trajectory_msgs/msg/JointTrajectory', stamp,
                    trajectory_cdr(NAMES, rng.normal(size=3), stamp)))
    return out


def _record(bag_dir, messages, storage='mcap', **kw):
    rec = EpisodeRecorder(bag_dir, storage=storage, **kw)
    for topic, msgtype, _, _ in messages:
        rec.add_topic(topic, msgtype)
    for topic, _, stamp, raw in messages:
        assert rec.write(topic, stamp, raw, block=True)
    return rec.close()


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_round_trip_is_byte_equal_with_rosbags(tmp_path, storage):
    messages = _messages()
    stats = _record(tmp_path / 'ep', messages, storage=storage)
    assert stats['recorded'] == len(messages) and stats['dropped'] == 0
    assert stats['error'] is None and stats['complete']
    assert stats['bytes'] == sum(len(m[3]) for m in messages)
    got = list(bag.read_messages(tmp_path / 'ep'))
    assert [(t, ty, s) for t, ty, s, _ in got] == [(t, ty, s) for t, ty, s, _ in messages]
    assert all(g[3] == m[3] for g, m in zip(got, messages))
    topics = bag.bag_topics(tmp_path / 'ep')
    assert topics['camera/image_raw'] == ('sensor_msgs/msg/Image', 30)
    # Every connection carries its type definition and an offered QoS profile.
    reader = bag.open_reader(tmp_path / 'ep')
    assert all(c.msgdef.data and c.digest.startswith('RIHS01_') and c.ext.offered_qos_profiles
               for c in reader.connections)
    reader.close()
    # The deserialised message is the one sent.
    msg = bag.typestore().deserialize_cdr(got[1][3], 'sensor_msgs/msg/JointState')
    assert list(msg.name) == list(NAMES)


def test_round_trip_is_byte_equal_with_mcap_library(tmp_path):
    from mcap.reader import make_reader

    messages = _messages()
    _record(tmp_path / 'ep', messages)
    with open(tmp_path / 'ep' / 'ep.mcap', 'rb') as stream:
        reader = make_reader(stream)
        got = [(channel.topic, schema.name, msg.log_time, msg.data)
               for schema, channel, msg in reader.iter_messages(log_time_order=True)]
        summary = reader.get_summary()
    assert got == [(t, ty, s, raw) for t, ty, s, raw in messages]
    assert summary.statistics.message_count == len(messages)
    assert {s.encoding for s in summary.schemas.values()} == {'ros2msg'}
    assert all('offered_qos_profiles' in c.metadata for c in summary.channels.values())


def test_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    messages = _messages(200)
    rec = EpisodeRecorder(tmp_path / 'ep', queue_size=1)
    for topic, msgtype, _, _ in messages[:3]:
        rec.add_topic(topic, msgtype)
    accepted = [rec.write(t, s, raw) for t, _, s, raw in messages]
    stats = rec.close()
    assert stats['recorded'] + stats['dropped'] == len(messages)
    assert stats['recorded'] == sum(accepted)
    kept = [m[3] for m, ok in zip(messages, accepted) if ok]
    assert [g[3] for g in bag.read_messages(tmp_path / 'ep')] == kept


def test_bad_inputs(tmp_path):
    rec = EpisodeRecorder(tmp_path / 'ep')
    with pytest.raises(EpisodeError, match='camera/image_raw.*add_topic'):
        rec.write('camera/image_raw', 1, b'\x00')
    with pytest.raises(EpisodeError, match='no_pkg/msg/Nope'):
        rec.add_topic('x', 'no_pkg/msg/Nope')
    rec.add_topic('x', 'std_msgs/msg/Float64MultiArray')
    with pytest.raises(EpisodeError, match='already recorded as'):
        rec.add_topic('x', 'sensor_msgs/msg/Image')
    rec.close()
    with pytest.raises(EpisodeError, match='exists already'):
        EpisodeRecorder(tmp_path / 'ep')
    with pytest.raises(EpisodeError, match='storage'):
        EpisodeRecorder(tmp_path / 'ep2', storage='rosbag1')


CHILD = textwrap.dedent('''
    import resource, signal, sys, time
    sys.path.insert(0, {root!r} + '/test')
    from rko_ros.episodes.recorder import EpisodeRecorder
    from test_episodes_recorder import _messages
    storage, mode = sys.argv[1], sys.argv[2]
    messages = _messages(40, (48, 64) if mode == 'diskfull' else (12, 16))
    if mode == 'diskfull':
        # A real write failure from the kernel: past RLIMIT_FSIZE write() fails with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150000, 150000))
    rec = EpisodeRecorder({bag!r}, storage=storage, flush_interval_s=0.05)
    for topic, msgtype, _, _ in messages[:3]:
        rec.add_topic(topic, msgtype)
    for topic, _, stamp, raw in messages:
        rec.write(topic, stamp, raw, block=True)
        if mode == 'diskfull':
            time.sleep(0.004)  # spread over several flushes, as a live episode is
    if mode == 'kill':
        while rec.stats()['recorded'] < len(messages):
            time.sleep(0.01)
        time.sleep(0.3)  # a few flush intervals
        print('READY', flush=True)
        time.sleep(60)
    stats = rec.close()
    print('STATS', stats['recorded'], stats['dropped'], stats['error'], flush=True)
''')


def _child(tmp_path, storage, mode):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = CHILD.format(root=root, bag=str(tmp_path / 'ep'))
    return subprocess.Popen([sys.executable, '-c', code, storage, mode], stdout=subprocess.PIPE,
                            text=True, cwd=root)


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_sigkill_mid_episode_leaves_a_repairable_bag(tmp_path, storage):
    proc = _child(tmp_path, storage, 'kill')
    assert proc.stdout.readline().strip() == 'READY'
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not bag.is_readable(tmp_path / 'ep')  # no metadata.yaml: the recorder never closed
    kept = bag.repair_bag(tmp_path / 'ep')
    messages = _messages(40)
    assert kept == len(messages)  # everything flushed before the kill
    got = list(bag.read_messages(tmp_path / 'ep'))
    assert sorted(g[3] for g in got) == sorted(m[3] for m in messages)
    assert bag.repair_bag(tmp_path / 'ep') == kept  # idempotent


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_disk_full_stops_the_episode_with_an_error(tmp_path, storage):
    proc = _child(tmp_path, storage, 'diskfull')
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    line = [x for x in out.splitlines() if x.startswith('STATS')][0]
    _, recorded, dropped, error = line.split(' ', 3)
    assert int(recorded) + int(dropped) == 120 and int(dropped) > 0
    # mcap sees EFBIG itself; SQLite reports it as a disk I/O error.
    assert ('file size limit' in error) if storage == 'mcap' else ('disk I/O error' in error)
    assert str(tmp_path / 'ep') in error and 'rko episodes repair' in error
    # What reached the disk before the failure is still recoverable.
    kept = bag.repair_bag(tmp_path / 'ep')
    assert 0 < kept <= int(recorded)
    assert len(list(bag.read_messages(tmp_path / 'ep'))) == kept
