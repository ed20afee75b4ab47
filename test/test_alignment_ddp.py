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


def test_rko_finetune_retrieves_from_the_root_versions_demonstrations(tmp_path):
    """`rko finetune --lambda-retrieved`: the demonstrations of the pretrained version (its card's
    episodes) that look like the desirable episodes join the fine-tuning, and the card says which."""
    from ros_testing import tiny_policy
    task = TaskConfig(image_size_px=(32, 32))
    styles = ('left_to_right', 'right_to_left')
    demos = collect_demonstrations(task, styles, 4, seed=100)
    demo_ids = write_episodes(tmp_path, demos, 'demonstrator', task.control_rate_hz)
    store = ModelStore(tmp_path)
    bare = store.write_version(tiny_policy(), method='pretrain', activate=True)
    parent = store.write_version(tiny_policy(), method='pretrain', activate=True,
                                 card_extra={'episodes': demo_ids})
    # The operator's episodes: other cloths, labelled desirable when folded left over right.
    rollouts = collect_demonstrations(task, styles, 3, seed=0)
    rollout_ids = write_episodes(tmp_path, rollouts, parent, task.control_rate_hz)
    with Catalog(tmp_path) as catalog:
        for episode_id, episode in zip(rollout_ids, rollouts):
            catalog.label(episode_id, episode['result'].style == 'left_to_right')
    argv = [sys.executable, '-m', 'rko_ros.cli', 'finetune', '--data-dir', str(tmp_path),
            '--method', 'rko', '--steps', '4', '--batch-size', '4', '--eval-every', '2',
            '--lambda-retrieved', '2', '--preference-min-timestep', '40',
            '--camera-topics', CAMERA_TOPIC, '--no-progress', '--json']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(argv + ['--from', parent], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    wanted = [i for i, e in zip(demo_ids, demos) if e['result'].style == 'left_to_right']
    assert len(wanted) == 4 and result['retrieval']['episodes'] == wanted
    assert result['retrieval']['of_episodes'] == 8
    card = store.read_card(result['version'])
    assert card['metrics']['retrieval']['episodes'] == wanted
    assert card['hyperparameters']['lambda_retrieved'] == 2.0
    assert card['hyperparameters']['preference_min_timestep'] == 40
    # A parent whose card names no demonstrations: a clear error, nothing written.
    proc = subprocess.run(argv + ['--from', bare], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and 'lambda_retrieved needs the behaviour' in proc.stderr, proc.stderr[-2000:]
    assert len(store.versions()) == 3
