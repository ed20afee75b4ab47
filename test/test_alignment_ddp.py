"""`rko finetune` under torchrun: two CPU ranks (gloo), one new version, one catalog run.

The same command runs on a GPU box with `--device cuda` (nccl); here it checks what multi-GPU
training relies on: ranks agree on early stopping, only rank 0 records and writes, and the
result is a normal version the policy node can load.
"""
import json
import os
import subprocess
import sys

from rko_ros.demo.offline import collect_demonstrations
from rko_ros.demo.pipeline import CAMERA_TOPIC, write_episodes
from rko_ros.episodes.catalog import Catalog
from rko_ros.policy.store import ModelStore
from rko_ros.sim.task import TaskConfig
from ros_testing import ROOT, add_version


def test_torchrun_two_ranks_write_one_version_and_one_run(tmp_path):
    task = TaskConfig(image_size_px=(32, 32))
    episodes = collect_demonstrations(task, ('left_to_right', 'right_to_left'), 3)
    ids = write_episodes(tmp_path, episodes, 'demonstrator', task.control_rate_hz)
    with Catalog(tmp_path) as catalog:
        for episode_id, episode in zip(ids, episodes):
            catalog.label(episode_id, episode['result'].style == 'left_to_right')
    parent = add_version(tmp_path)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         '-m', 'rko_ros.cli', 'finetune', '--data-dir', str(tmp_path), '--method', 'rko',
         '--steps', '6', '--batch-size', '4', '--eval-every', '2', '--camera-topics',
         CAMERA_TOPIC, '--no-progress', '--json'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    assert len(results) == 1, proc.stdout  # rank 0 only
    result = results[0]
    assert result['parent'] == parent and result['world_size'] == 2
    store = ModelStore(tmp_path)
    assert store.versions() == [parent, result['version']]
    assert store.active_version() == parent
    card = store.read_card(result['version'])
    assert card['metrics']['world_size'] == 2 and card['parent'] == parent
    assert sorted(card['episodes']) == sorted(ids)
    store.load_policy(result['version'])  # a complete, loadable version
    with Catalog(tmp_path) as catalog:
        runs = catalog.runs()
    assert [(r['status'], r['new_version']) for r in runs] == [('done', result['version'])]
