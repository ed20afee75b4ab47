"""`rko demo --quick`: the whole loop through the real nodes, as CI can afford it."""
import json
import os
import subprocess
import sys
from pathlib import Path

from rko_ros.episodes.catalog import Catalog
from rko_ros.policy.store import ModelStore


def test_quick_demo_runs_the_loop_end_to_end(tmp_path):
    out = tmp_path / 'demo'
    # Two desirable labels of 5 cannot come from 4 labels: round 1 waits for them up to its cap
    # (3 of the 4), round 2 labels the last one.
    result = subprocess.run([sys.executable, '-m', 'rko_ros.cli', 'demo', '--quick', '--out', str(out),
                             '--round-min-desirable', '5', '--noise-scale', '0.5',
                             '--chunk-candidates', '3', '--json'],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert 'preferred-style success' in result.stdout
    assert summary['labelled_episodes'] == 4 and summary['after']['episodes'] == 2
    # The policy node sampled at the noise scale asked for (read back from policy/status).
    assert summary['noise_scale'] == 0.5 and 'policy noise scale 0.5' in result.stdout
    assert summary['chunk_candidates'] == 3
    assert 'chunks the most coherent of 3 draws' in result.stdout
    # Failed demonstrations are redone (or left out), so every one kept folded well.
    pretrain = summary['pretrain']
    assert pretrain['demonstration_success'] == 1.0
    assert pretrain['demonstrations_redone'] >= 0 and pretrain['demonstrations_left_out'] >= 0
    # Pretraining drew the windows where the gripper closes or opens 3x as often (the default).
    assert pretrain['event_weight'] == 3.0 and 0 < pretrain['event_windows'] < pretrain['windows']
    # Every episode, scripted or run through the policy node, is a complete bag in the catalog.
    with Catalog(str(out)) as catalog:
        episodes = catalog.list()
        labels = catalog.labelled_episodes()
        bags = [catalog.bag_path(e['id']) for e in episodes]
    assert len(episodes) == 6 + 4 + 2
    assert all(e['status'] == 'complete' for e in episodes)
    assert len(labels) == 4                      # labelled through feedback/label_last
    assert all(os.path.isfile(os.path.join(bag, 'metadata.yaml')) for bag in bags)
    # Outcomes say which particle was grasped: the demonstrator's is its style's grasp particle;
    # the policy episodes' come from the sim node's results and the demo summarises them.
    assert [e['outcome']['grasp_offset_m'] for e in episodes[:6]] == [0.0] * 6
    for stage in ('before', 'after'):
        s = summary[stage]
        assert 0.0 <= s['grasp_off_target_share'] <= 1.0 and 0 <= s['no_grasp'] <= s['episodes']
    assert 'grasps off the grasp point' in result.stdout
    # Two evaluation episodes: the table says how little a rate over them means (sqrt(.25/2)).
    assert 'one standard error of a rate over 2 episodes: up to 35.4%' in result.stdout
    store = ModelStore(str(out))
    pretrained = summary['pretrained_version']
    assert store.versions()[0] == pretrained
    if summary['finetune_skipped']:
        assert summary['aligned_version'] == summary['pretrained_version']
    else:
        assert summary['aligned_version'] in store.versions() and summary['rollback_ok']
        # The demo fine-tunes with the retrieval anchor: the card says which demonstrations.
        retrieval = store.read_card(summary['aligned_version'])['metrics']['retrieval']
        demos = store.read_card(summary['pretrained_version'])['episodes']
        assert retrieval['of_episodes'] == len(demos) == 6
        assert set(retrieval['episodes']) <= set(demos) and set(retrieval['scores']) == set(demos)
    report = os.listdir(summary['report_dir'])
    assert 'before_after.png' in report and 'summary.json' in report
    assert any(name.startswith('after_episode') for name in report)
    # Two label rounds, 3 + 1 (see above): round 2 ran on the model round 1 left running.
    rounds = summary['rounds']
    assert [r['episodes'] for r in rounds] == [3, 1] and rounds[0]['model_version'] == pretrained
    assert 'round 1 labelled 3 episodes (planned 2)' in result.stderr
    assert rounds[1]['model_version'] == rounds[0]['new_version']
    assert rounds[-1]['new_version'] == summary['aligned_version']
    assert 'round 2: 1 episode of' in result.stdout
    # Where the time went: every stage timed, together within the wall time.
    stage_s = summary['stage_s']
    expected = {'demonstrations', 'pretraining', 'bring_up', 'labelled_episodes', 'evaluation'}
    expected |= set() if summary['finetune_skipped'] else {'fine_tuning'}
    assert set(stage_s) == expected and all(v > 0 for v in stage_s.values())
    assert sum(stage_s.values()) <= summary['wall_s']
    assert f"time by stage: demonstrations {stage_s['demonstrations']:.0f} s" in result.stdout
    _two_finetunings_in_a_row(out, list(labels))


def test_quick_demo_with_a_wrist_camera(tmp_path):
    """--wrist-view-m adds the sim's wrist camera to every stage: the demonstrations' bags, the
    policy's cameras, the recorded ROS episodes, and a fine-tuning through trainer/start."""
    from rosbags.highlevel import AnyReader
    from rko_ros.demo.loop import RosLoop, write_demo_params
    from rko_ros.demo.pipeline import DemoConfig
    from rko_ros.ros.commands import default_config_path
    out = tmp_path / 'demo'
    result = subprocess.run([sys.executable, '-m', 'rko_ros.cli', 'demo', '--quick', '--out', str(out),
                             '--wrist-view-m', '0.15', '--json'],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    store = ModelStore(str(out))
    pretrained = summary['pretrained_version']
    assert store.load_policy(pretrained).config.obs.camera_names == ['camera', 'wrist_camera']
    with Catalog(str(out)) as catalog:
        episodes = catalog.list()
        bags = [catalog.bag_path(e['id']) for e in episodes]
    assert len(episodes) == 6 + 4 + 2 and all(e['status'] == 'complete' for e in episodes)
    for bag in (bags[0], bags[-1]):           # a demonstration and a ROS episode
        with AnyReader([Path(bag)]) as reader:
            counts = {c.topic.rsplit('/', 2)[-2]: c.msgcount for c in reader.connections
                      if c.topic.endswith('image_raw')}
        assert set(counts) == {'camera', 'wrist_camera'} and counts['camera'] == counts['wrist_camera'] > 0
    with Catalog(str(out)) as catalog:       # both kinds of label, whatever the tiny policy did
        ids = [e['id'] for e in episodes[6:8]]
        catalog.label(ids[0], True)
        catalog.label(ids[1], False)
    params = write_demo_params(str(out / 'wrist_params.yaml'),
                               DemoConfig.quick(data_dir=str(out), wrist_view_m=0.15,
                                                guard_tolerance=None),
                               default_config_path())
    loop = RosLoop(str(out), params, log_path=str(out / 'wrist_up.log'))
    try:
        loop.wait_ready()
        version = loop.finetune_and_reload()
        loop.spin_for(1.0)
        running = loop.policy_status.get('model_version')
    finally:
        loop.close()
    assert running == version != summary['aligned_version'] and version in store.versions()
    assert store.load_policy(version).config.obs.camera_names == ['camera', 'wrist_camera']


def _two_finetunings_in_a_row(out, labels):
    """The demo's rounds fine-tune twice through trainer/start: the second wait must end on its
    own run, not on the first run's 'done' (the trainer keeps publishing it until the next start)."""
    from rko_ros.demo.loop import RosLoop, write_demo_params
    from rko_ros.demo.pipeline import DemoConfig
    from rko_ros.ros.commands import default_config_path
    with Catalog(str(out)) as catalog:      # both kinds of label, whatever the tiny policy did
        catalog.label(labels[0], True)
        catalog.label(labels[1], False)
    params = write_demo_params(str(out / 'two_params.yaml'),
                               DemoConfig.quick(data_dir=str(out), guard_tolerance=None),
                               default_config_path())
    store = ModelStore(str(out))
    loop = RosLoop(str(out), params, log_path=str(out / 'two_up.log'))
    try:
        loop.wait_ready()
        first = loop.finetune_and_reload()
        second = loop.finetune_and_reload()
        loop.spin_for(1.0)
        running = loop.policy_status.get('model_version')
    finally:
        loop.close()
    assert first != second and {first, second} <= set(store.versions())
    assert store.read_card(second)['parent'] == first and running == second


def test_every_style_is_demonstrated_on_the_same_cloth_placements():
    """A placement of its own per style lets the policy learn style = f(placement)."""
    import numpy as np
    from rko_ros.demo.offline import collect_demonstrations
    from rko_ros.sim.task import TaskConfig
    task = TaskConfig(image_size_px=(32, 32))
    styles = ('left_to_right', 'right_to_left')
    shared = collect_demonstrations(task, styles, 2)
    assert [e['style'] for e in shared] == list(styles) * 2
    for i in range(2):
        a, b = shared[2 * i], shared[2 * i + 1]
        assert np.array_equal(a['images'][0], b['images'][0])            # same cloth, same pose
        assert a['result'].style == 'left_to_right' and b['result'].style == 'right_to_left'
    assert not np.array_equal(shared[0]['images'][0], shared[2]['images'][0])   # next placement
    own = collect_demonstrations(task, styles, 1, shared_poses=False)
    assert not np.array_equal(own[0]['images'][0], own[1]['images'][0])


def test_failed_demonstrations_are_redone_on_the_same_cloth_or_left_out():
    """attempts > 1 keeps only folds that worked, as a team keeps the teleoperated
    demonstrations that did; a failure is redone on the same cloth with a new noise draw."""
    import numpy as np
    from rko_ros.demo.offline import collect_demonstrations
    from rko_ros.sim.task import TaskConfig
    task = TaskConfig(image_size_px=(32, 32))
    style = ('left_to_right',)
    as_came = collect_demonstrations(task, style, 6, noise=2.0)
    assert [e['seed'] for e in as_came] == list(range(6)) and {e['attempt'] for e in as_came} == {0}
    failed = [e['seed'] for e in as_came if not e['result'].success]
    assert failed                                   # at this noise some folds fail
    kept = collect_demonstrations(task, style, 6, noise=2.0, attempts=2)
    assert all(e['result'].success and e['result'].style == 'left_to_right' for e in kept)
    by_seed = {e['seed']: e for e in kept}
    for e in as_came:
        if e['result'].success:                     # first tries that worked are kept unchanged
            assert by_seed[e['seed']]['attempt'] == 0
            assert np.array_equal(by_seed[e['seed']]['action'], e['action'])
        elif e['seed'] in by_seed:                  # redone: same cloth, new noise
            again = by_seed[e['seed']]
            assert again['attempt'] == 1 and not np.array_equal(again['action'], e['action'])
            assert np.array_equal(again['images'][0], e['images'][0])
    left_out = set(failed) - set(by_seed)
    assert len(kept) == 6 - len(left_out)
    # The seeds here: cloth 4 fails once and is redone; cloth 0 fails twice and is left out.
    assert failed == [0, 4] and left_out == {0}


def test_demo_noise_scales_the_demonstrators_scatter(tmp_path):
    """The demo's demonstrations use DemoConfig.demo_noise: at 0 every grasp is exactly on the
    style's grasp particle, at the default some are off it by millimetres (never a particle)."""
    import numpy as np
    import pytest
    from rko_ros.demo.pipeline import DemoConfig, record_demonstrations
    from rko_ros.errors import ConfigError
    from rko_ros.sim.styles import STYLES
    from rko_ros.sim.task import ClothFoldTask

    def grasp_errors(noise):
        cfg = DemoConfig(data_dir=str(tmp_path / f'n{noise}'), demos_per_style=3,
                         styles=('left_to_right',), image_size_px=(32, 32), demo_noise=noise)
        _, episodes = record_demonstrations(cfg)
        task = ClothFoldTask(cfg.task_config())
        out = []
        for e in episodes:
            task.reset(e['seed'])
            want = task.sim.x[STYLES['left_to_right'].grasp_index(task.sim.n), :2]
            first_closed = np.nonzero(e['action'][:, 2] >= 0.5)[0][0]
            out.append(float(np.linalg.norm(e['action'][first_closed, :2] - want)))
            assert e['result'].success and e['result'].grasp_offset_m == 0.0
        return np.array(out)
    assert DemoConfig().demo_noise == 0.5
    assert grasp_errors(0.0).max() < 1e-6
    assert 1e-4 < grasp_errors(0.5).max() < 0.015
    with pytest.raises(ConfigError, match='demo_noise=-1'):
        DemoConfig(demo_noise=-1)
    assert DemoConfig().demo_attempts == 3
    with pytest.raises(ConfigError, match='demo_attempts=0 must be >= 1'):
        DemoConfig(demo_attempts=0)
    assert DemoConfig().pretrain_precision == 'auto'   # the faster of fp32 / bf16, timed
    with pytest.raises(ConfigError, match="pretrain_precision='half' must be one of fp32"):
        DemoConfig(pretrain_precision='half')
    assert DemoConfig(pretrain_precision='auto').policy_config().train.precision == 'auto'


def test_offline_rollouts_pick_coherent_chunks_as_the_policy_node_does():
    """candidates=1 draws exactly as before; above 1 every chunk after the first is, of its
    draws, the one nearest what the chunk before planned for the same ticks."""
    import numpy as np
    import torch
    from rko_ros.demo import offline
    from rko_ros.demo.pipeline import DemoConfig
    from rko_ros.policy.model import DiffusionPolicy
    from rko_ros.policy.runtime import coherent_choice
    cfg = DemoConfig.quick()
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg.policy_config()).eval()
    card = offline.card_like(policy.config)
    calls = []

    def predict(images, state, noise):
        out = offline.torch_predictor(policy)(images, state, noise)
        calls.append(out)
        return out

    def rollouts(candidates):
        calls.clear()
        return offline.evaluate_policy(predict, card, cfg.task_config(), [5, 6], batch=2,
                                       candidates=candidates)
    one = rollouts(1)
    assert [c.shape[0] for c in calls] == [2] * len(calls)
    reference = offline.BatchedChunkPolicy(offline.torch_predictor(policy), 1, 16, 3, 8,
                                           seed=[0, 5]).run(
        [offline.ClothFoldTask(cfg.task_config()) for _ in range(2)], [5, 6])
    for a, b in zip(one, reference):
        np.testing.assert_array_equal(a['action'], b['action'])
    coherent = rollouts(3)
    assert [c.shape[0] for c in calls] == [6] * len(calls) and len(calls) >= 5
    # Draw 0 is the draw of one sample per chunk: the first chunks are the same.
    np.testing.assert_allclose(coherent[0]['action'][:8], one[0]['action'][:8], atol=1e-5)
    for i, episode in enumerate(coherent):
        for k in range(1, len(calls)):
            draws = calls[k].reshape(2, 3, 16, 3)[i]
            previous = calls[k - 1].reshape(2, 3, 16, 3)[i]
            kept_before = previous[[np.abs(previous[j, :8] - episode['action'][8 * (k - 1):8 * k]).max()
                                    for j in range(3)].index(0.0) if k > 1 else 0]
            pick = coherent_choice(draws[None], kept_before[None, 8:])[0]
            executed = episode['action'][8 * k:8 * k + 8]
            np.testing.assert_array_equal(executed, draws[pick, :len(executed)])


def test_demo_passes_its_fine_tuning_settings_to_the_trainer_node(tmp_path):
    import yaml
    from rko_ros.demo.loop import write_demo_params
    from rko_ros.demo.pipeline import DemoConfig
    from rko_ros.ros.commands import default_config_path
    cfg = DemoConfig(lambda_u=0.25, lambda_sft=2.0, lambda_d=0.5, device='cpu', guard_tolerance=None,
                     preference_min_timestep=30, lambda_retrieved=8.0, noise_scale=0.25,
                     finetune_lr=5e-4, chunk_candidates=5)
    path = write_demo_params(str(tmp_path / 'p.yaml'), cfg, default_config_path())
    with open(path) as f:
        trainer = yaml.safe_load(f)['/**/trainer_node']['ros__parameters']
    extra = trainer['extra_args']
    pairs = dict(zip(extra[:-1], extra[1:]))
    assert pairs['--lambda-u'] == '0.25' and pairs['--lambda-sft'] == '2.0'
    assert pairs['--lambda-d'] == '0.5'
    assert pairs['--device'] == 'cpu' and extra[-1] == '--no-guard'
    assert trainer['steps'] == 1200 and pairs['--patience'] == '0' and '--freeze-encoder' not in extra
    assert pairs['--lambda-retrieved'] == '8.0' and pairs['--lr'] == '0.0005'
    assert pairs['--retrieved-undesirable-share'] == '0.5'     # the demo's default
    assert pairs['--preference-min-timestep'] == '30'
    assert pairs['--select'] == 'last' and pairs['--ema-decay'] == '0.995'   # the demo's defaults
    # No episode runs while the demo fine-tunes: every core trains (the node alone keeps one).
    assert trainer['train_threads'] == len(os.sched_getaffinity(0)) >= 1
    with open(path) as f:   # every ROS episode samples at the demo's noise scale
        params = yaml.safe_load(f)
    assert params['/**/policy_node']['ros__parameters']['noise_scale'] == 0.25
    assert params['/**/policy_node']['ros__parameters']['chunk_candidates'] == 5
    sim = params['/**/sim_node']['ros__parameters']    # joint states once per control tick
    assert sim['joint_state_rate_hz'] == sim.get('control_rate_hz', 10.0) == 10.0
    # The cameras: the policy and the recorder take every camera the sim publishes, in order.
    for wrist, topics in ((0.0, ['camera/image_raw']),
                          (0.15, ['camera/image_raw', 'wrist_camera/image_raw'])):
        path = write_demo_params(str(tmp_path / 'w.yaml'), DemoConfig(wrist_view_m=wrist),
                                 default_config_path())
        with open(path) as f:
            params = yaml.safe_load(f)
        policy = params['/**/policy_node']['ros__parameters']
        assert policy['camera_topics'] == topics == \
            params['/**/episode_node']['ros__parameters']['camera_topics']
        assert policy['camera_names'] == [t.split('/')[0] for t in topics]
        assert params['/**/sim_node']['ros__parameters']['wrist_view_m'] == wrist
        assert DemoConfig(wrist_view_m=wrist).policy_config().obs.camera_names == policy['camera_names']
    cfg = DemoConfig(freeze_encoder=True, finetune_select='margin', finetune_ema_decay=0.0, finetune_patience=4, finetune_steps=600, lambda_retrieved=0.0,
                     preference_min_timestep=0, finetune_threads=1)
    path = write_demo_params(str(tmp_path / 'q.yaml'), cfg, default_config_path())
    with open(path) as f:
        trainer = yaml.safe_load(f)['/**/trainer_node']['ros__parameters']
    extra = trainer['extra_args']
    assert trainer['train_threads'] == 1
    assert trainer['steps'] == 600 and '--freeze-encoder' in extra
    assert dict(zip(extra[:-1], extra[1:]))['--patience'] == '4' and '--lambda-retrieved' not in extra
    assert '--preference-min-timestep' not in extra
    assert '--retrieved-undesirable-share' not in extra       # no retrieval, nothing to share
    sft = write_demo_params(str(tmp_path / 's.yaml'), DemoConfig(method='sft'), default_config_path())
    with open(sft) as f:      # sft has no undesirable windows to take from demonstrations
        sft_extra = yaml.safe_load(f)['/**/trainer_node']['ros__parameters']['extra_args']
    assert '--lambda-retrieved' in sft_extra and '--retrieved-undesirable-share' not in sft_extra
    assert dict(zip(extra[:-1], extra[1:]))['--select'] == 'margin'
    assert dict(zip(extra[:-1], extra[1:]))['--ema-decay'] == '0.0'
    # The trainer node's command line is `rko finetune`'s: these flags parse into its config.
    from rko_ros.cli import build_parser
    args = build_parser().parse_args(['finetune'] + extra)
    assert (args.select, args.ema_decay, args.patience) == ('margin', 0.0, 4)
    assert args.lr == DemoConfig().finetune_lr
    with open(tmp_path / 'p.yaml') as f:
        first = yaml.safe_load(f)['/**/trainer_node']['ros__parameters']['extra_args']
    assert build_parser().parse_args(['finetune'] + first).retrieved_undesirable_share == 0.5
    assert build_parser().parse_args(['finetune'] + first).lambda_d == 0.5
    import pytest
    from rko_ros.alignment.trainer import FinetuneConfig
    from rko_ros.errors import TrainingError
    with pytest.raises(TrainingError, match='lambda_u=-1'):
        FinetuneConfig(lambda_u=-1.0)
    # DemoConfig checks the fine-tuning options as FinetuneConfig does, under its own names; its
    # share goes to kto/rko runs with the retrieval anchor only (sft and dpo get 0, not an error).
    from rko_ros.errors import ConfigError
    with pytest.raises(ConfigError, match='finetune_threads=-1 must be >= 0'):
        DemoConfig(finetune_threads=-1)
    for bad, match in ((dict(finetune_lr=0.5), r'finetune_lr=0.5 must be in \(0, 0.1\]'),
                       (dict(finetune_select='best'), "finetune_select 'best' must be"),
                       (dict(finetune_ema_decay=1.0), r'finetune_ema_decay=1.0 must be in \[0, 1\)'),
                       (dict(retrieved_undesirable_share=1.0), 'retrieved_undesirable_share=1.0'),
                       (dict(method='ppo'), "method 'ppo' is unknown"),
                       (dict(wrist_view_m=0.01), 'wrist_view_m=0.01 must be 0'),
                       (dict(wrist_view_m=0.15, shift_px=2), 'fixed cameras only'),
                       (dict(lambda_d=-1.0), 'lambda_d=-1.0 must be >= 0'),
                       (dict(lambda_u=-0.5), 'lambda_u=-0.5 must be >= 0'),
                       (dict(lambda_sft=-4.0), 'lambda_sft=-4.0 must be >= 0'),
                       (dict(event_weight=0.5), 'event_weight=0.5 must be 1..100'),
                       (dict(event_weight=float('nan')), 'event_weight=nan must be 1..100')):
        with pytest.raises(ConfigError, match=match):
            DemoConfig(**bad)
    assert [DemoConfig(method=m).finetune_undesirable_share(m) for m in ('rko', 'kto', 'sft', 'dpo')] \
        == [0.5, 0.5, 0.0, 0.0]
    assert DemoConfig(lambda_retrieved=0.0).finetune_undesirable_share('rko') == 0.0
    with pytest.raises(TrainingError, match=r'lr=2.0 must be in \(0, 1.0\]'):
        FinetuneConfig(lr=2.0)


def test_quick_alignment_bench_uses_quick_sizes_and_reports_failed_cells(tmp_path):
    """`rko bench alignment --quick` pretrains 20 steps (not the full 3000), and a cell whose runs
    cannot fine-tune (no desirable label) says why instead of printing a NaN as a result."""
    out = tmp_path / 'bench'
    cmd = [sys.executable, '-m', 'rko_ros.cli', 'bench', 'alignment', '--quick', '--methods', 'sft',
           'rko', '--out', str(out), '--json']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    def no_nan(name):
        raise AssertionError(f'{name} in the JSON line')
    bench = json.loads(result.stdout.strip().splitlines()[-1], parse_constant=no_nan)
    assert bench['labels'] == [2, 4] and bench['seeds'] == 1 and bench['eval_episodes'] == 2
    assert bench['finetune_steps'] == 6 and bench['finetune_lr'] == 1e-4   # as published
    card = ModelStore(str(out)).read_card(bench['pretrained_version'])
    assert card['metrics']['steps'] == 20 and len(card['episodes']) == 3 * 2
    assert bench['pretrained']['episodes'] == 2 and 'grasp_off_target_share' in bench['pretrained']
    assert os.path.isfile(bench['plot'])
    assert len(bench['runs']) == 2 * 2
    for run in bench['runs']:
        cell = bench['table'][run['method']][str(run['labels'])]
        if 'error' in run:       # a 20-step policy rarely folds well enough to be labelled good
            assert run['desirable'] == 0 and 'desirable' in run['error']
            assert cell['preferred_success_mean'] is None and run['error'] in cell['errors']
            assert 'failed' in result.stdout and run['error'] in result.stdout
        else:
            assert 0.0 <= cell['preferred_success_mean'] <= 1.0 and run['version']
            assert 0.0 < cell['preferred_success_se'] <= 0.5
    assert set(bench['rko_ahead_beyond_two_se_of']) <= set(bench['rko_ahead_of'])
    assert set(bench['rko_ahead_by_labels']) == {'2', '4'}
    assert bench['rko_ahead_by_labels']['4'] == {'ahead_of': bench['rko_ahead_of'],
                                                 'beyond_two_se_of': bench['rko_ahead_beyond_two_se_of']}
    assert 'by more than two standard errors' in result.stdout
    bad = subprocess.run(cmd[:-1] + ['--seeds', '0'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and '--seeds 0 must be >= 1' in bad.stderr
    bad = subprocess.run(cmd[:-1] + ['--first-seed', '-1'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and '--first-seed -1 must be >= 0' in bad.stderr


def test_bench_says_which_leads_the_runs_can_tell():
    """Three seeds x 40 episodes as measured on 2026-11-29: rko's 4 points over dpo are a lead in
    the means, not beyond two standard errors; 32.5 points over a method at 50% are."""
    import numpy as np
    import pytest
    from rko_ros.demo.bench import ahead_of, standard_error
    # Binomial: 0.825 over 120 episodes; the seeds' spread (std 0.043 / sqrt 3) is smaller.
    assert standard_error([0.8, 0.8, 0.875], 40) == pytest.approx(np.sqrt(0.825 * 0.175 / 120))
    # Seeds far apart: their spread is the larger error.
    assert standard_error([0.5, 1.0], 40) == pytest.approx(np.std([0.5, 1.0], ddof=1) / np.sqrt(2))
    # One seed that folded every cloth still has an error (half an episode from 1).
    assert 0.0 < standard_error([1.0], 40) < 0.03 and standard_error([], 40) is None
    runs = {'rko': [0.8, 0.8, 0.875], 'sft': [0.8, 0.8, 0.925], 'kto': [0.825, 0.85, 0.825],
            'dpo': [0.75, 0.8, 0.8], 'fkpd': [0.5, 0.55, 0.45]}
    table = {m: {'20': {'preferred_success_mean': float(np.mean(r)),
                        'preferred_success_se': standard_error(r, 40)}} for m, r in runs.items()}
    table['rpo'] = {'20': {'preferred_success_mean': None, 'preferred_success_se': None}}
    assert ahead_of(table, list(table), '20') == (['dpo', 'fkpd'], ['fkpd'])
    table['rko']['20']['preferred_success_mean'] = None
    assert ahead_of(table, list(table), '20') == ([], [])


def _bench_line(methods, labels, runs, **settings):
    """A JSON line of `rko bench alignment --json` holding `runs` (method, labels, seed, rate)."""
    result = {'bench': 'alignment', 'preferred_style': 'left_to_right', 'eval_episodes': 40,
              'finetune_steps': 1200, 'lambda_retrieved': 32.0, 'pretrained_version': 'v0001-pretrain',
              'pretrained': {'episodes': 40, 'preferred_success': 0.35}, 'methods': methods,
              'labels': labels, 'seeds': max(r[2] for r in runs) + 1, 'table': {}, 'rko_ahead_of': [],
              'plot': 'elsewhere.png',
              'runs': [{'method': m, 'labels': n, 'seed': s, 'desirable': n // 4, 'episodes': 40,
                        'preferred_success': rate, 'mean_quality': 0.8, 'grasp_off_target_share': 0.1}
                       for m, n, s, rate in runs]}
    result.update(settings)
    return result


def test_bench_merge_combines_runs_split_over_processes(tmp_path):
    """`rko bench alignment --merge`: this session's sweep (5 / 10 / 40 labels, one seed) and the
    three-seed 20-label run of rko, sft and kto, each its own process, give one table whose cells
    and leads are those of the runs; runs of other settings or clashing numbers are refused."""
    import pytest
    from rko_ros.demo.bench import merge_results, standard_error
    from rko_ros.errors import RkoError
    sweep = _bench_line(['rko', 'sft', 'kto'], [5, 10, 40], [
        ('rko', 5, 0, 0.55), ('sft', 5, 0, 0.525), ('kto', 5, 0, 0.55),
        ('rko', 10, 0, 0.775), ('sft', 10, 0, 0.875), ('kto', 10, 0, 0.85),
        ('rko', 40, 0, 0.875), ('sft', 40, 0, 0.9), ('kto', 40, 0, 0.85)])
    twenty = _bench_line(['rko', 'sft', 'kto', 'dpo'], [20], [
        (m, 20, s, r) for m, rates in (('rko', (0.8, 0.8, 0.875)), ('sft', (0.8, 0.8, 0.925)),
                                       ('kto', (0.825, 0.85, 0.825)), ('dpo', (0.75, 0.8, 0.8)))
        for s, r in enumerate(rates)])
    merged = merge_results([sweep, twenty, sweep])      # a file given twice counts once
    assert merged['methods'] == ['rko', 'sft', 'kto', 'dpo'] and merged['labels'] == [5, 10, 20, 40]
    assert len(merged['runs']) == 9 + 12 and merged['seeds'] == 3 and 'plot' not in merged
    cell = merged['table']['rko']['20']
    assert cell['preferred_success_runs'] == [0.8, 0.8, 0.875]
    assert cell['preferred_success_mean'] == pytest.approx(0.825)
    assert cell['preferred_success_se'] == pytest.approx(standard_error([0.8, 0.8, 0.875], 40))
    assert merged['table']['dpo']['5']['preferred_success_mean'] is None   # not run: no number
    assert merged['rko_ahead_by_labels'] == {
        '5': {'ahead_of': ['sft'], 'beyond_two_se_of': []},
        '10': {'ahead_of': [], 'beyond_two_se_of': []},
        '20': {'ahead_of': ['dpo'], 'beyond_two_se_of': []},
        '40': {'ahead_of': ['kto'], 'beyond_two_se_of': []}}
    assert merged['rko_ahead_of'] == ['kto'] and merged['rko_ahead_beyond_two_se_of'] == []
    assert merged['eval_episodes'] == 40 and merged['pretrained_version'] == 'v0001-pretrain'

    other_base = dict(twenty, pretrained_version='v0002-pretrain')
    with pytest.raises(RkoError, match=r"result 2 is not from the same pretrained model.*"
                                       r"pretrained_version \('v0001-pretrain' / 'v0002-pretrain'\)"):
        merge_results([sweep, other_base])
    with pytest.raises(RkoError, match='lambda_retrieved'):
        merge_results([sweep, dict(twenty, lambda_retrieved=0.0)])
    # A result from before lambda_d was recorded ran with 1.0, the only value there was then.
    assert 'lambda_d' not in sweep
    assert len(merge_results([sweep, dict(twenty, lambda_d=1.0)])['runs']) == 9 + 12
    with pytest.raises(RkoError, match=r'lambda_d \(1.0 / 0.0\)'):
        merge_results([sweep, dict(twenty, lambda_d=0.0)])
    # The next seed from another process (--first-seed 1); seed 0 rerun there, named anew.
    seed1 = _bench_line(['rko', 'sft'], [40], [('rko', 40, 1, 0.925), ('sft', 40, 1, 0.85)],
                        first_seed=1)
    rerun = dict(sweep, runs=[dict(r, version='v0042-rko') for r in sweep['runs']])
    both = merge_results([sweep, seed1, rerun])
    assert both['table']['rko']['40']['preferred_success_runs'] == [0.875, 0.925]
    assert both['table']['kto']['40']['preferred_success_runs'] == [0.85]
    assert both['seeds'] == 2 and len(both['runs']) == 9 + 2
    assert both['rko_ahead_by_labels']['40']['ahead_of'] == ['sft', 'kto']
    with pytest.raises(RkoError, match='result 1 is not an alignment bench result'):
        merge_results([{'bench': 'inference'}, sweep])
    clash = _bench_line(['rko'], [40], [('rko', 40, 0, 0.8)])
    with pytest.raises(RkoError, match='rko at 40 labels, seed 0, is in two results with '
                                       'different numbers'):
        merge_results([sweep, clash])

    # The command: files holding the --json output (a table above the line), a plot under --out.
    paths = []
    for i, result in enumerate((sweep, twenty)):
        paths.append(tmp_path / f'part{i}.json')
        paths[-1].write_text('table printed first\n' + json.dumps(result) + '\n')
    out = tmp_path / 'merged'
    cmd = [sys.executable, '-m', 'rko_ros.cli', 'bench', 'alignment', '--merge', *map(str, paths),
           '--out', str(out), '--json']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line['rko_ahead_by_labels'] == merged['rko_ahead_by_labels']
    assert line['plot'] == str(out / 'alignment_bench.png') and os.path.isfile(line['plot'])
    assert '1-3 seeds x 40 evaluation episodes' in result.stdout
    assert 'at 5 labels: ahead of sft' in result.stdout and 'not run' in result.stdout
    assert not list(out.glob('*.sqlite'))               # nothing trained, no store made
    (tmp_path / 'log.txt').write_text('fine-tune + evaluate: 100%\n')
    bad = subprocess.run(cmd[:6] + [str(tmp_path / 'log.txt')], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and 'does not end with the JSON line' in bad.stderr


def test_label_rounds_split_the_labelled_episodes(tmp_path):
    import pytest
    from rko_ros.demo.pipeline import DemoConfig, round_sizes
    from rko_ros.errors import ConfigError
    assert round_sizes(20, 2) == [10, 10] and round_sizes(5, 2) == [3, 2]
    assert round_sizes(4, 1) == [4] and round_sizes(7, 3) == [3, 2, 2]
    assert DemoConfig().label_rounds == 2 and DemoConfig.quick().label_rounds == 2
    with pytest.raises(ConfigError, match='label_rounds=5 must be 1..label_episodes'):
        DemoConfig(label_episodes=4, label_rounds=5)
    bad = subprocess.run([sys.executable, '-m', 'rko_ros.cli', 'demo', '--quick', '--label-rounds',
                          '0', '--out', str(tmp_path / 'd')], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and 'label_rounds=0 must be 1..label_episodes (4)' in bad.stderr
    assert not (tmp_path / 'd').exists()      # refused before anything was written


def test_a_round_waits_for_desirable_labels_within_its_cap():
    """Round 1 of 20 in two rounds plans 10 and may take up to 15 while the labels so far hold
    fewer than two desirable episodes; the last round takes what is left."""
    from rko_ros.demo.pipeline import round_done, round_plan
    assert round_plan(20, 2) == (10, 15) and round_plan(20, 1) == (20, 20)
    assert round_plan(21, 3) == (7, 15) and round_plan(4, 2) == (2, 3)

    def simulate(labels, min_desirable=2, method='rko', total=20, rounds=2):
        sizes, used = [], 0
        for r in range(rounds):
            planned, cap = round_plan(total - used, rounds - r)
            n = 0
            while not round_done(n, planned, cap, sum(labels[:used + n]),
                                 used + n - sum(labels[:used + n]), method, min_desirable):
                n += 1
            sizes.append(n)
            used += n
        return sizes
    seed0 = [0, 1, 0, 0, 0, 0, 1, 0, 0, 0] + [1, 0] * 5      # two desirable in round 1
    assert simulate(seed0) == [10, 10]
    late = [0] * 12 + [1, 0, 1] + [0] * 5                    # the second one at episode 15
    assert simulate(late) == [15, 5]
    never = [0] * 20                                         # the cap ends the wait
    assert simulate(never) == [15, 5]
    assert simulate(late, min_desirable=0) == [10, 10]       # 0: fixed even rounds
    assert simulate([1] * 20, method='sft') == [10, 10]
    assert simulate([1] * 20) == [15, 5]                     # rko also needs an undesirable one


def test_bf16_pretraining_where_it_is_not_native_is_refused_before_any_work(tmp_path, monkeypatch):
    import os
    import pytest
    from rko_ros.demo.commands import _pretrained
    from rko_ros.demo.pipeline import DemoConfig
    from rko_ros.errors import TrainingError
    from rko_ros.policy import train as train_mod
    monkeypatch.setattr(train_mod, 'bf16_native', lambda device: False)   # as on such a CPU
    cfg = DemoConfig.quick(data_dir=str(tmp_path / 'd'), pretrain_precision='bf16')
    with pytest.raises(TrainingError, match="train.precision='bf16' on 'cpu'"):
        _pretrained(cfg, progress=False)
    assert not os.path.exists(os.path.join(cfg.data_dir, 'episodes'))   # no demonstration made


def test_bench_plot_draws_one_bar_per_method_for_a_single_label_count(tmp_path, monkeypatch):
    """With one label count the plot is a bar per method at its mean (+- one standard error);
    a method not run there has no bar height. Over several counts: one line per method."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.axes
    import numpy as np
    import pytest
    from rko_ros.demo.bench import _plot, merge_results
    twenty = _bench_line(['rko', 'sft', 'dpo'], [20], [
        ('rko', 20, 0, 0.85), ('rko', 20, 1, 0.95), ('sft', 20, 0, 0.9), ('sft', 20, 1, 0.8)])
    merged = merge_results([twenty])
    bars, lines = [], []
    real_bar, real_errorbar = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.errorbar

    def bar(self, x, height, **kw):
        bars.append((x, height, kw['label']))
        return real_bar(self, x, height, **kw)

    def errorbar(self, x, y, **kw):
        if kw.get('label') != '_nolegend_':             # not a bar's own error bar
            lines.append((list(x), list(y), kw['label']))
        return real_errorbar(self, x, y, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, 'bar', bar)
    monkeypatch.setattr(matplotlib.axes.Axes, 'errorbar', errorbar)
    path = _plot(merged, str(tmp_path / 'one.png'))
    assert os.path.getsize(path) > 1000 and not lines
    assert [(x, label) for x, _, label in bars] == [(0, 'rko'), (1, 'sft'), (2, 'dpo')]
    assert bars[0][1] == pytest.approx(0.9) and bars[1][1] == pytest.approx(0.85)
    assert np.isnan(bars[2][1])                         # dpo: not run, no number
    sweep = merge_results([_bench_line(['rko'], [5, 10], [('rko', 5, 0, 0.5), ('rko', 10, 0, 0.8)])])
    bars.clear()
    _plot(sweep, str(tmp_path / 'two.png'))
    assert not bars and lines == [([5, 10], [0.5, 0.8], 'rko')]
