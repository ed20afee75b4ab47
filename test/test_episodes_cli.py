"""`rko episodes ...` and `rko bench recorder` through the real CLI entry point."""
import json
import os
import subprocess
import sys

import numpy as np

from rko_ros.cli import main
from rko_ros.episodes.catalog import Catalog
from rko_ros.episodes.recorder import EpisodeRecorder
from rko_ros.episodes.synthetic import write_episode

NAMES = ('gripper_x', 'gripper_y', 'gripper_closed')


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _episodes(data_dir, count=2):
    ids = []
    with Catalog(data_dir) as catalog:
        for seed in range(count):
            rng = np.random.default_rng(seed)
            eid = catalog.start_episode('v0001-pretrain')
            with EpisodeRecorder(catalog.bag_path(eid)) as rec:
                write_episode(rec, rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8),
                              rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), 10.0, NAMES)
            catalog.finish_episode(eid, outcome={'success': bool(seed)})
            ids.append(eid)
    return ids


def test_episodes_commands(tmp_path, capsys):
    a, b = _episodes(tmp_path)
    d = ['--data-dir', str(tmp_path)]
    code, out, _ = _run(capsys, 'episodes', 'list', *d)
    assert code == 0 and a in out and 'complete' in out
    assert _run(capsys, 'episodes', 'label', a, 'good', *d)[0] == 0
    assert _run(capsys, 'episodes', 'label', b.replace('ep', '').lstrip('0'), 'bad', *d)[0] == 0
    code, out, _ = _run(capsys, 'episodes', 'list', '--json', *d)
    rows = json.loads(out)
    assert [(r['id'], r['label']) for r in rows] == [(a, True), (b, False)]
    code, out, _ = _run(capsys, 'episodes', 'prefer', b, a, '--json', *d)
    assert json.loads(out)['winner_id'] == b
    code, out, _ = _run(capsys, 'episodes', 'undo', *d)
    assert f'undid preference {b} over {a}' in out
    code, out, _ = _run(capsys, 'episodes', 'undo', '--json', *d)
    assert json.loads(out)['undone']['episode_id'] == b
    code, out, _ = _run(capsys, 'episodes', 'show', a, '--json', *d)
    shown = json.loads(out)
    assert shown['label'] is True and shown['topics']['camera/image_raw']['messages'] == 4
    code, out, _ = _run(capsys, 'episodes', 'show', a, *d)
    assert 'joint_states  sensor_msgs/msg/JointState  4 messages' in out
    code, out, _ = _run(capsys, 'episodes', 'export', a, '--out', str(tmp_path / 'x'), *d)
    assert code == 0 and (tmp_path / 'x' / a / 'metadata.yaml').exists()
    assert json.loads((tmp_path / 'x' / f'{a}.json').read_text())['id'] == a
    code, out, _ = _run(capsys, 'episodes', 'repair', *d)
    assert 'nothing to repair' in out


def test_episodes_errors_are_one_line(tmp_path, capsys):
    _episodes(tmp_path, 1)
    d = ['--data-dir', str(tmp_path)]
    code, _, err = _run(capsys, 'episodes', 'label', 'ep000042', 'good', *d)
    assert code == 2 and "episode 'ep000042' is not in the catalog" in err
    assert len(err.strip().splitlines()) == 1
    with Catalog(tmp_path) as catalog:
        open_id = catalog.start_episode('v1')
        catalog.finish_episode(open_id, complete=False)
    code, _, err = _run(capsys, 'episodes', 'label', open_id, 'bad', *d)
    assert code == 2 and 'is incomplete' in err


def test_bench_recorder_counts_every_message(tmp_path):
    """A short real run: ROS 2 publisher child -> raw subscriptions -> recorder -> bag."""
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, '-m', 'rko_ros.cli', 'bench', 'recorder', '--json', '--seconds', '1.5',
         '--cameras', '2', '--width', '64', '--height', '48', '--rate-hz', '20',
         '--joint-rate-hz', '50', '--out', str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['lost'] == 0 and result['sent'] == result['recorded'] == result['in_bag']
    assert result['sent'] >= 0.8 * 1.5 * (2 * 20 + 50)
    assert result['mb_per_s'] > 0 and result['queue_max'] >= 1
    assert os.path.exists(os.path.join(result['bag'], 'metadata.yaml'))
