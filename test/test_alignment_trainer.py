"""The fine-tuning trainer on a synthetic two-mode policy: every method moves toward the labels."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rko_ros.alignment.trainer import FinetuneConfig, LabelledWindows, PreferenceTrainer, finetune
from rko_ros.alignment.weights import rko_weights
from rko_ros.errors import GuardRejected, ModelFileError, TrainingError
from rko_ros.policy.config import PolicyConfig
from rko_ros.policy.model import DiffusionPolicy
from rko_ros.policy.store import ModelStore
from rko_ros.policy.synthetic import RIGHT, make_decide_execute_windows, make_two_mode_windows, mode_of
from rko_ros.policy.train import train_bc

TINY = dict(obs={'image_size_px': [32, 32]},
            model={'encoder_channels': [8, 16], 'feature_dim': 16, 'down_dims': [32, 64],
                   'diffusion_step_embed_dim': 32},
            train={'steps': 400, 'batch_size': 32, 'lr': 1e-3, 'warmup_steps': 20, 'num_threads': 1})


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = PolicyConfig.preset('small', **TINY)
    windows, modes = make_two_mode_windows(config, n=128)
    ema, _ = train_bc(DiffusionPolicy(config), windows, progress=False)
    store = ModelStore(tmp_path_factory.mktemp('align'))
    parent = store.write_version(ema, method='pretrain', activate=True)
    # 16 "episodes" of 8 windows each, all of one mode; RIGHT ones are labelled desirable.
    episode_modes = np.arange(16) % 2
    modes = np.repeat(episode_modes, 8)
    windows, _ = make_two_mode_windows(config, n=128, modes=modes, seed=1)
    label = np.where(modes == RIGHT, 1, -1)
    data = LabelledWindows(windows, label, np.arange(128) // 8, [f'ep{i:03d}' for i in range(16)])
    return store, parent, data, windows


def right_fraction(policy, windows, n=64):
    with torch.no_grad():
        actions = policy.sample(torch.as_tensor(windows.images[:n]), torch.as_tensor(windows.state[:n]),
                                torch.randn(n, 16, 3, generator=torch.Generator().manual_seed(7))).numpy()
    return float((mode_of(actions) == RIGHT).mean())


@pytest.fixture(scope='module')
def results(pretrained):
    store, parent, data, windows = pretrained
    out = {'before': right_fraction(store.load_policy(parent), windows)}
    for method in ('sft', 'kto', 'rko', 'dpo', 'rpo', 'fkpd'):
        cfg = FinetuneConfig(method=method, steps=40, batch_size=16, eval_every=20, patience=100)
        version, summary = finetune(store, parent, data, cfg, behaviour=windows, progress=False)
        out[method] = right_fraction(store.load_policy(version), windows)
        out[method + '_version'] = version
    print('favoured-mode fraction:', {k: v for k, v in out.items() if not k.endswith('_version')})
    return out


@pytest.mark.parametrize('method', ['sft', 'kto', 'rko', 'dpo', 'rpo', 'fkpd'])
def test_every_method_moves_toward_the_favoured_mode(results, method):
    assert 0.25 <= results['before'] <= 0.75          # the pretrained policy really is two-moded
    assert results[method] >= results['before'] + 0.15, results


def test_rko_and_kto_move_toward_the_favoured_mode_at_every_seed(pretrained, results):
    # Measured here over three fine-tuning seeds (40 steps): kto 0.95 / 0.70 / 0.73, rko 0.72 /
    # 0.70 / 0.75 (before 0.42): rko is not faster on this task, where every window shows the same
    # scene, so the (centred) similarity weights have nothing to tell apart. What holds at every
    # seed is that both move toward the favoured mode. Where windows differ (decide-then-execute,
    # below), rko is measured ahead of kto.
    store, parent, data, windows = pretrained
    fractions = {'kto': [results['kto']], 'rko': [results['rko']]}
    for seed in (1, 2):
        for method in ('kto', 'rko'):
            cfg = FinetuneConfig(method=method, steps=40, batch_size=16, eval_every=20,
                                 patience=100, seed=seed)
            version, _ = finetune(store, parent, data, cfg, progress=False)
            fractions[method].append(right_fraction(store.load_policy(version), windows))
    print('favoured-mode fraction per seed:', fractions)
    for method, values in fractions.items():
        assert min(values) >= results['before'] + 0.15, fractions


@pytest.fixture(scope='module')
def decide_execute(tmp_path_factory):
    """Pretrained on a decide-then-execute task; 16 labelled episodes (RIGHT ones desirable),
    one decision window and three execution windows each, labelled per episode."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = PolicyConfig.preset('small', **TINY)
    windows, _, _ = make_decide_execute_windows(config, n_episodes=32, execute_windows=3)
    ema, _ = train_bc(DiffusionPolicy(config), windows, progress=False)
    store = ModelStore(tmp_path_factory.mktemp('decide'))
    parent = store.write_version(ema, method='pretrain', activate=True)
    windows, modes, decision = make_decide_execute_windows(
        config, n_episodes=16, execute_windows=3, modes=np.arange(16) % 2, seed=1)
    data = LabelledWindows(windows, np.where(modes == RIGHT, 1, -1), windows.episode_index,
                           [f'ep{i:03d}' for i in range(16)])
    return store, parent, data, modes, decision


def test_centred_similarity_weights_single_out_the_decision(decide_execute):
    # Undesirable decision windows share their scene with desirable ones; undesirable execution
    # windows show a scene no desirable window shows. RKO should weigh the former more.
    store, parent, data, modes, decision = decide_execute
    q = torch.as_tensor(data.label)
    ratios = {}
    for centre in (False, True):
        trainer = PreferenceTrainer(store.load_policy(parent), data,
                                    FinetuneConfig(method='rko', center_embeddings=centre),
                                    progress=False)
        idx = np.arange(len(data.label))
        t, eps = trainer.policy.sample_timesteps_and_noise(len(idx))
        _, _, z, _ = trainer._errors(trainer._batch(idx), t, eps)
        rng = np.random.default_rng(0)
        dec_w, exe_w = [], []
        for _ in range(100):
            b = np.concatenate([rng.choice(np.flatnonzero(data.label > 0), 8),
                                rng.choice(np.flatnonzero(data.label < 0), 8)])
            s = rko_weights(z[b], q[b], 0.15).numpy()
            loser = data.label[b] < 0
            dec_w += list(s[loser & decision[b]])
            exe_w += list(s[loser & ~decision[b]])
        ratios[centre] = np.mean(dec_w) / np.mean(exe_w)
    print('decision / execution loser weight, uncentred vs centred:', ratios)
    assert ratios[True] >= 3.0 and ratios[True] > 2 * ratios[False], ratios


def test_rko_and_kto_level_when_episodes_decide_then_execute(decide_execute):
    # Favoured-mode share of sampled decisions after 40 steps, five fine-tuning seeds. Both move
    # it; which of the two moves it more depends on the seeds and on the CPU's float paths. When
    # written (another 2-core machine): before 0.34, kto mean 0.57, rko 0.74. On a 2-core AVX-512/
    # AMX machine (2026-11-27) these five seeds gave kto 0.65, rko 0.64, and seeds 5-11 kto 0.77,
    # rko 0.74. So rko is level with kto here, not ahead; the centred weights (test above) do
    # single out the decision windows, but that does not turn into a reliable speed-up.
    store, parent, data, modes, decision = decide_execute
    idx = np.flatnonzero(decision)
    sub = data.windows.subset(idx[np.arange(64) % len(idx)])
    fractions = {'before': right_fraction(store.load_policy(parent), sub)}
    for method in ('kto', 'rko'):
        fractions[method] = []
        for seed in range(5):
            cfg = FinetuneConfig(method=method, steps=40, batch_size=16, eval_every=40,
                                 patience=100, seed=seed)
            version, _ = finetune(store, parent, data, cfg, progress=False)
            fractions[method].append(right_fraction(store.load_policy(version), sub))
    print('decide-then-execute favoured-mode fraction per seed:', fractions)
    assert 0.2 <= fractions['before'] <= 0.8
    for method in ('kto', 'rko'):
        assert np.mean(fractions[method]) >= fractions['before'] + 0.15, fractions
    # Level within the seeds' spread (per-seed sd about 0.13, so 0.06 on a mean of five).
    assert np.mean(fractions['rko']) >= np.mean(fractions['kto']) - 0.15, fractions


def test_new_version_card_and_files(pretrained, results):
    store, parent, _, _ = pretrained
    version = results['rko_version']
    card = store.read_card(version)
    assert card['parent'] == parent and card['method'] == 'rko'
    assert card['hyperparameters']['tau'] == 0.15 and card['hyperparameters']['beta'] == 12.0
    assert len(card['episodes']) == 16
    assert np.isfinite(card['metrics']['best_holdout_margin'])
    files = os.listdir(store.version_dir(version))
    assert {'checkpoint.pt', 'policy.onnx', 'card.yaml', 'metrics.csv', 'training.png'} <= set(files)
    assert store.active_version() == parent     # fine-tuning never switches the live model itself


def test_bad_inputs(pretrained):
    store, parent, data, windows = pretrained
    only_good = LabelledWindows(windows, np.ones(128, int), data.episode_index, data.episode_ids)
    with pytest.raises(TrainingError, match='no undesirable'):
        finetune(store, parent, only_good, FinetuneConfig(method='rko', steps=1), progress=False)
    unlabelled = LabelledWindows(windows, np.zeros(128, int), data.episode_index, data.episode_ids)
    with pytest.raises(TrainingError, match='no labelled episodes'):
        finetune(store, parent, unlabelled, FinetuneConfig(method='kto', steps=1), progress=False)
    tiny = LabelledWindows(windows.subset([0, 8]), np.array([-1, 1]), np.array([0, 1]), ['a', 'b'])
    with pytest.raises(TrainingError, match='too few labelled windows'):
        finetune(store, parent, tiny, FinetuneConfig(method='kto', steps=1), progress=False)
    with pytest.raises(ModelFileError, match="version 'v0999-nope' does not exist"):
        finetune(store, 'v0999-nope', data, FinetuneConfig(method='kto', steps=1), progress=False)
    with pytest.raises(TrainingError, match="method 'ppo' is unknown"):
        FinetuneConfig(method='ppo')
    with pytest.raises(TrainingError, match='fkpd needs the behaviour'):
        finetune(store, parent, data, FinetuneConfig(method='fkpd', steps=1), progress=False)


def test_killed_run_leaves_no_version_and_active_untouched(pretrained, tmp_path):
    store, parent, data, windows = pretrained
    np.savez(tmp_path / 'data.npz', images=windows.images, state=windows.state, action=windows.action,
             label=data.label, episode=data.episode_index)
    script = f'''
import numpy as np, torch
torch.set_num_threads(1)
from rko_ros.alignment.trainer import FinetuneConfig, LabelledWindows, finetune
from rko_ros.policy.store import ModelStore
from rko_ros.policy.train import ArrayWindows
d = np.load({str(tmp_path / 'data.npz')!r})
w = ArrayWindows(d['images'], d['state'], d['action'])
data = LabelledWindows(w, d['label'], d['episode'])
def on_step(step, row):
    if step == 3:
        print('RUNNING', flush=True)
finetune(ModelStore({store.data_dir!r}), {parent!r}, data, FinetuneConfig(method='rko', steps=100000), progress=False, on_step=on_step)
'''
    before = store.versions()
    proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'RUNNING'
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert store.versions() == before
    assert store.active_version() == parent


@pytest.mark.parametrize('method', ['rko', 'dpo'])
def test_anchors_add_their_bc_errors_and_are_off_by_default(pretrained, method):
    from rko_ros.alignment.trainer import PreferenceTrainer
    store, parent, data, windows = pretrained
    policy = store.load_policy(parent)

    def loss_with(lambda_sft, lambda_behaviour=0.0):
        cfg = FinetuneConfig(method=method, batch_size=8, lambda_sft=lambda_sft,
                             lambda_behaviour=lambda_behaviour, seed=3)
        trainer = PreferenceTrainer(policy, data, cfg, behaviour=windows, progress=False)
        torch.manual_seed(11)
        return trainer.loss()

    plain, plain_metrics = loss_with(0.0)
    anchored, metrics = loss_with(2.5)
    assert 'sft_anchor' not in plain_metrics and metrics['sft_anchor'] > 0
    # Same batch, t and eps (seeded): the difference is exactly 2.5 x the per-dimension BC error.
    assert float((anchored - plain).detach()) == pytest.approx(2.5 * metrics['sft_anchor'], rel=1e-4)
    # The behaviour (demonstration) anchor: + 0.5 x their BC error, drawn after the method's batch.
    behaviour, b_metrics = loss_with(0.0, lambda_behaviour=0.5)
    assert 'behaviour_anchor' not in plain_metrics and b_metrics['behaviour_anchor'] > 0
    assert float(behaviour - plain) == pytest.approx(0.5 * b_metrics['behaviour_anchor'], rel=1e-4)
    with pytest.raises(TrainingError, match='behaviour'):
        PreferenceTrainer(policy, data, FinetuneConfig(method=method, lambda_behaviour=1.0),
                          behaviour=None, progress=False)


def test_a_fine_tuning_repeats_bit_for_bit_given_its_seed(pretrained):
    """The bench compares methods by their seeds: a seed must name one run, on two threads too."""
    store, parent, data, windows = pretrained

    def weights(seed):
        cfg = FinetuneConfig(method='rko', steps=6, batch_size=8, eval_every=3, patience=100,
                             seed=seed, num_threads=2, lambda_retrieved=1.0, lambda_sft=1.0)
        try:
            version, _ = finetune(store, parent, data, cfg, behaviour=windows, progress=False)
        finally:
            torch.set_num_threads(1)
        return store.load_policy(version).state_dict()

    first, again, other = weights(3), weights(3), weights(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_ema_is_what_gets_selected_and_kept(pretrained):
    from rko_ros.alignment.trainer import PreferenceTrainer
    store, parent, data, _ = pretrained
    cfg = FinetuneConfig(method='rko', steps=4, batch_size=8, eval_every=1, patience=100,
                         ema_decay=0.5, seed=5)
    trainer = PreferenceTrainer(store.load_policy(parent), data, cfg, progress=False)
    names = [n for n, _ in trainer.policy.named_parameters()]
    ema = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    averages, raw, margins = {}, {}, {}

    def on_step(step, row):
        decay = min(0.5, (1.0 + step) / (10.0 + step))
        for n, p in trainer.policy.named_parameters():
            ema[n] = decay * ema[n] + (1 - decay) * p.detach()
        averages[step] = {n: v.clone() for n, v in ema.items()}
        raw[step] = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
        margins[step] = row['holdout_margin']
    summary = trainer.run(on_step=on_step)
    best = max(margins, key=margins.get)
    assert summary['best_step'] == best
    final = dict(trainer.policy.named_parameters())
    # The kept weights are the hand-computed average at the best evaluation, not the raw weights.
    for n in names:
        torch.testing.assert_close(final[n].detach(), averages[best][n], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(averages[best][n], raw[best][n]) for n in names)
    with pytest.raises(TrainingError, match='ema_decay=1.0 must be in'):
        FinetuneConfig(method='rko', ema_decay=1.0)
    with pytest.raises(TrainingError, match='lambda_sft=-1 must be >= 0'):
        FinetuneConfig(method='rko', lambda_sft=-1)


def test_select_last_keeps_the_latest_checkpoint_within_the_guard(pretrained):
    from rko_ros.alignment.trainer import PreferenceTrainer
    store, parent, data, _ = pretrained
    base = dict(method='rko', steps=6, batch_size=8, eval_every=2, patience=0, seed=7)
    runs = {}
    for select in ('margin', 'last'):
        trainer = PreferenceTrainer(store.load_policy(parent), data, FinetuneConfig(**base, select=select),
                                    progress=False)
        weights, margins = {}, {}

        def on_step(step, row, trainer=trainer, weights=weights, margins=margins):
            if 'holdout_margin' in row:
                margins[step] = row['holdout_margin']
                weights[step] = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
        summary = trainer.run(on_step=on_step)
        runs[select] = (summary, margins)
        kept = summary['best_step']
        assert kept == (max(margins, key=margins.get) if select == 'margin' else 6)
        assert summary['best_holdout_margin'] == margins[kept]
        for n, p in trainer.policy.named_parameters():
            assert torch.equal(p.detach(), weights[kept][n])
    assert runs['margin'][1] == runs['last'][1]            # same run, only the choice differs
    # 'last' still keeps only a checkpoint within the execution guard: a guard no checkpoint
    # meets leaves nothing, one every checkpoint meets keeps the last.
    guarded = FinetuneConfig(**base, select='last', guard_tolerance=0.0)
    trainer = PreferenceTrainer(store.load_policy(parent), data, guarded, progress=False)
    trainer.guard_reference = 1e-9
    assert not trainer.run()['kept']
    trainer = PreferenceTrainer(store.load_policy(parent), data, guarded, progress=False)
    trainer.guard_reference = 1e9
    assert trainer.run()['best_step'] == 6
    with pytest.raises(TrainingError, match="select 'best' must be 'margin' or 'last'"):
        FinetuneConfig(method='rko', select='best')


def test_execution_guard_keeps_only_checkpoints_that_still_act(pretrained):
    from rko_ros.alignment.trainer import PreferenceTrainer
    store, parent, data, windows = pretrained
    # A learning rate far too high: the preference term wrecks the denoiser within a few steps.
    wild = dict(method='rko', steps=6, batch_size=16, lr=0.5, eval_every=2, patience=100, seed=2)
    trainer = PreferenceTrainer(store.load_policy(parent), data, FinetuneConfig(**wild, guard_tolerance=None),
                                progress=False)
    unguarded = trainer.run()
    assert unguarded['kept'] and unguarded['guard'] is None
    # The guard's windows: the held-out desirable ones, with fixed noise.
    held_out_good = np.intersect1d(trainer.holdout_idx, np.flatnonzero(data.label > 0))
    assert trainer.guard_source == 'held-out desirable' and len(held_out_good) > 0
    assert np.array_equal(trainer.guard_windows[1], held_out_good)
    wrecked = trainer.guard_error(trainer.policy)
    assert wrecked == trainer.guard_error(trainer.policy)
    assert wrecked > 3 * trainer.guard_error(trainer.reference)
    # Guarded, evaluated only at that wrecked last step: nothing is within 1.5x, so the run fails
    # with the numbers and the fix, and no version is written.
    before = store.versions()
    with pytest.raises(GuardRejected, match=r'no checkpoint kept the denoising error on the '
                                            r'held-out desirable windows within 1\.5x'):
        finetune(store, parent, data, FinetuneConfig(**dict(wild, eval_every=6), guard_tolerance=0.5),
                 progress=False)
    assert store.versions() == before and store.active_version() == parent
    # A sane run: every evaluation is measured and one within the tolerance is kept.
    cfg = FinetuneConfig(method='rko', steps=6, batch_size=16, eval_every=2, patience=100, seed=2,
                         guard_tolerance=0.5)
    trainer = PreferenceTrainer(store.load_policy(parent), data, cfg, progress=False)
    summary = trainer.run()
    guard = summary['guard']
    assert summary['kept'] and guard['rejected_evaluations'] == 0
    assert [r['step'] for r in trainer.history if 'guard_error' in r] == [2, 4, 6]
    assert guard['kept_error'] == pytest.approx(trainer.guard_error(trainer.policy), rel=1e-5)
    assert guard['kept_error'] <= 1.5 * guard['reference_error']
    # On the demonstrations instead (they need the behaviour windows).
    behaviour_cfg = FinetuneConfig(method='rko', guard_windows='behaviour')
    trainer = PreferenceTrainer(store.load_policy(parent), data, behaviour_cfg, behaviour=windows,
                                progress=False)
    assert trainer.guard_source == 'behaviour' and len(trainer.guard_windows[1]) == 128
    with pytest.raises(TrainingError, match="guard_windows 'behaviour' needs the pretraining"):
        PreferenceTrainer(store.load_policy(parent), data, behaviour_cfg, progress=False)
    with pytest.raises(TrainingError, match='guard_tolerance=-0.1 must be >= 0'):
        FinetuneConfig(method='rko', guard_tolerance=-0.1)


def test_freeze_encoder_trains_the_action_network_only(pretrained):
    from rko_ros.alignment.trainer import PreferenceTrainer
    store, parent, data, windows = pretrained
    parent_state = store.load_policy(parent).state_dict()
    cfg = FinetuneConfig(method='rko', steps=6, batch_size=16, eval_every=2, patience=0, seed=3,
                         freeze_encoder=True)
    trainer = PreferenceTrainer(store.load_policy(parent), data, cfg, progress=False)
    summary = trainer.run()
    assert summary['steps_run'] == 6                       # patience 0: no early stop
    after = trainer.policy.state_dict()
    encoder = [n for n in after if n.startswith('encoders.')]
    unet = [n for n in after if n.startswith('unet.') and after[n].dtype.is_floating_point]
    assert encoder and unet
    assert all(torch.equal(after[n], parent_state[n]) for n in encoder)
    assert sum(not torch.equal(after[n], parent_state[n]) for n in unet) > len(unet) // 2
    # Without freezing, the same run moves the encoders too.
    cfg = FinetuneConfig(method='rko', steps=6, batch_size=16, eval_every=2, patience=0, seed=3)
    trainer = PreferenceTrainer(store.load_policy(parent), data, cfg, progress=False)
    trainer.run()
    moved = trainer.policy.state_dict()
    assert any(not torch.equal(moved[n], parent_state[n]) for n in encoder)
    with pytest.raises(TrainingError, match='patience=-1 must be >= 0'):
        FinetuneConfig(method='rko', patience=-1)


def test_retrieval_anchor_learns_from_the_demonstrations_like_the_desirable_episodes(pretrained):
    from rko_ros.policy.train import ArrayWindows
    store, parent, data, _ = pretrained
    config = store.load_policy(parent).config
    # 24 demonstration "episodes" of 6 windows each, alternating modes; the labels favour RIGHT.
    demo_modes = np.repeat(np.arange(24) % 2, 6)
    demos, _ = make_two_mode_windows(config, n=len(demo_modes), modes=demo_modes, seed=5)
    behaviour = ArrayWindows(demos.images, demos.state, demos.action, np.arange(len(demo_modes)) // 6)
    cfg = FinetuneConfig(method='rko', steps=4, batch_size=8, eval_every=2, patience=0,
                         lambda_retrieved=2.0, seed=3)
    trainer = PreferenceTrainer(store.load_policy(parent), data, cfg, behaviour=behaviour, progress=False)
    retrieval = trainer.retrieval
    right = {str(e) for e in range(24) if e % 2 == RIGHT}
    assert set(retrieval['episodes']) == right            # every RIGHT demonstration, no LEFT one
    assert retrieval['windows'] == 72 and retrieval['of_episodes'] == 24
    assert all((score > 0.5) == (eid in right) for eid, score in retrieval['scores'].items())
    assert retrieval['desirable_reach'] is not None and set(retrieval['distances']) == set(retrieval['scores'])
    assert set(mode_of(behaviour.action[trainer.retrieved]).tolist()) == {RIGHT}
    # A fixed threshold takes exactly the episodes scored above it (a softer softmax, so that
    # the scores spread out instead of being 0 or 1).
    soft = dataclasses.replace(cfg, retrieval_tau=2.0)
    spread = PreferenceTrainer(store.load_policy(parent), data, soft, behaviour=behaviour,
                               progress=False).retrieval['scores']
    ranked = sorted(spread.values())
    assert 0.0 < ranked[0] and ranked[-1] < 1.0 and ranked[-7] < ranked[-6]
    cut = (ranked[-7] + ranked[-6]) / 2
    strict = PreferenceTrainer(store.load_policy(parent), data,
                               dataclasses.replace(soft, retrieval_threshold=cut),
                               behaviour=behaviour, progress=False).retrieval
    assert set(strict['episodes']) == {e for e, v in spread.items() if v > cut}
    assert len(strict['episodes']) == 6 and strict['windows'] == 36
    # The anchor is + lambda x the retrieved windows' BC error, drawn after the method's batch.
    torch.manual_seed(11)
    anchored, metrics = trainer.loss()
    plain_trainer = PreferenceTrainer(store.load_policy(parent), data,
                                      dataclasses.replace(cfg, lambda_retrieved=0.0),
                                      behaviour=behaviour, progress=False)
    torch.manual_seed(11)
    plain, plain_metrics = plain_trainer.loss()
    assert 'retrieved_anchor' not in plain_metrics and metrics['retrieved_anchor'] > 0
    assert float((anchored - plain).detach()) == pytest.approx(2.0 * metrics['retrieved_anchor'], rel=1e-4)
    summary = trainer.run()
    assert summary['retrieval']['episodes'] == retrieval['episodes']
    assert plain_trainer.run()['retrieval'] is None
    # sft takes the anchor too; without demonstrations there is nothing to retrieve from.
    sft = PreferenceTrainer(store.load_policy(parent), data, dataclasses.replace(cfg, method='sft'),
                            behaviour=behaviour, progress=False)
    assert 'retrieved_anchor' in sft.loss()[1]
    with pytest.raises(TrainingError, match='lambda_retrieved needs the behaviour'):
        PreferenceTrainer(store.load_policy(parent), data, cfg, progress=False)
    with pytest.raises(TrainingError, match='retrieval_tau=0 must be > 0'):
        FinetuneConfig(method='rko', retrieval_tau=0)
    with pytest.raises(TrainingError, match='lambda_retrieved=-1 must be >= 0'):
        FinetuneConfig(method='rko', lambda_retrieved=-1)
    with pytest.raises(TrainingError, match=r'retrieval_threshold=1.0 must be in \[0, 1\)'):
        FinetuneConfig(method='rko', retrieval_threshold=1.0)
    with pytest.raises(TrainingError, match='retrieval_reach=-1 must be >= 0'):
        FinetuneConfig(method='rko', retrieval_reach=-1)


def test_retrieval_leaves_out_a_style_no_label_shows(pretrained, monkeypatch):
    """The relative score alone retrieves a kind of demonstration no label shows whenever it is
    less unlike the desirable episodes than the undesirable ones (the cloth demo's diagonal folds
    when only right_to_left ones were labelled bad). The reach test keeps only demonstrations as
    near the desirable episodes as those are to each other. Features are set by hand here: unit
    vectors at an angle, desirable windows near 0 degrees, undesirable ones at 180."""
    from rko_ros.alignment import trainer as trainer_module
    from rko_ros.policy.train import ArrayWindows
    store, parent, data, _ = pretrained
    config = store.load_policy(parent).config
    rng = np.random.default_rng(0)
    # 12 demonstration episodes of 4 windows: like the desirable ones (0 deg), an unlabelled
    # kind (60 deg), like the undesirable ones (180 deg).
    kinds = np.repeat(np.arange(12) % 3, 4)
    demos, _ = make_two_mode_windows(config, n=len(kinds), modes=np.zeros(len(kinds), int), seed=2)
    behaviour = ArrayWindows(demos.images, demos.state, demos.action, np.arange(len(kinds)) // 4)
    angle = {'labelled': np.where(data.label > 0, 0.0, 180.0) + rng.normal(0, 2.0, len(data.label)),
             'behaviour': np.array([0.0, 60.0, 180.0])[kinds] + rng.normal(0, 2.0, len(kinds))}

    def features(self, source, idx, center):
        a = np.radians(angle['behaviour' if source is self.behaviour else 'labelled'][idx])
        u = torch.as_tensor(np.stack([np.cos(a), np.sin(a)], axis=1), dtype=torch.float32)
        return torch.cat([u, u], dim=1)        # two unit halves, as the real features have
    monkeypatch.setattr(trainer_module.PreferenceTrainer, '_retrieval_features', features)
    cfg = FinetuneConfig(method='rko', steps=2, batch_size=8, lambda_retrieved=1.0, seed=3)
    reach_on = PreferenceTrainer(store.load_policy(parent), data, cfg, behaviour=behaviour,
                                 progress=False).retrieval
    reach_off = PreferenceTrainer(store.load_policy(parent), data,
                                  dataclasses.replace(cfg, retrieval_reach=0.0), behaviour=behaviour,
                                  progress=False).retrieval
    like = {str(e) for e in range(12) if e % 3 == 0}
    unlabelled = {str(e) for e in range(12) if e % 3 == 1}
    assert all(reach_on['scores'][e] > 0.5 for e in like | unlabelled)    # the score can't tell
    assert set(reach_off['episodes']) == like | unlabelled
    assert set(reach_on['episodes']) == like
    # Distances: 1 - cos; the desirable episodes' leave-one-out distance is a few degrees' worth.
    assert reach_on['desirable_reach'] < 1 - np.cos(np.radians(10))
    assert all(reach_on['distances'][e] > 0.4 for e in unlabelled)
    assert all(reach_on['distances'][e] <= 2 * reach_on['desirable_reach'] for e in like)
    # The other side: demonstrations like the undesirable episodes (180 deg) and within their
    # reach, never the unlabelled kind, give part of each batch's undesirable windows.
    both = PreferenceTrainer(store.load_policy(parent), data,
                             dataclasses.replace(cfg, retrieved_undesirable_share=0.5),
                             behaviour=behaviour, progress=False)
    bad_like = {str(e) for e in range(12) if e % 3 == 2}
    assert set(both.retrieval['undesirable']['episodes']) == bad_like
    assert set(both.retrieval['episodes']) == like                  # this side is unchanged
    assert both.retrieval['undesirable']['windows'] == 16 == len(both.rejected)
    assert set(kinds[both.rejected].tolist()) == {2}
    assert all(both.retrieval['undesirable']['distances'][e] > 0.4 for e in like | unlabelled)
    assert 'undesirable' not in reach_on
    drawn = []
    collate_batch = both._batch

    def recording(indices, source=None):
        drawn.append((np.asarray(indices).copy(), source is behaviour))
        return collate_batch(indices, source)
    both._batch = recording
    loss, metrics = both.loss()
    assert torch.isfinite(loss) and 'retrieved_anchor' in metrics
    labelled, from_demos = drawn[0], [idx for idx, demo in drawn[1:] if demo]
    assert not labelled[1] and len(labelled[0]) == 8 - 2     # 4 undesirable, 2 of them demos
    assert (data.label[labelled[0]] > 0).sum() == 4 and (data.label[labelled[0]] < 0).sum() == 2
    assert len(from_demos[0]) == 2 and set(kinds[from_demos[0]].tolist()) == {2}
    assert set(kinds[from_demos[1]].tolist()) == {0}          # the anchor: the desirable side
    with pytest.raises(TrainingError, match='retrieved_undesirable_share is for kto/rko'):
        FinetuneConfig(method='dpo', lambda_retrieved=1.0, retrieved_undesirable_share=0.5)
    with pytest.raises(TrainingError, match='retrieved_undesirable_share needs lambda_retrieved'):
        FinetuneConfig(method='rko', retrieved_undesirable_share=0.5)
    with pytest.raises(TrainingError, match=r'retrieved_undesirable_share=1.0 must be in \[0, 1\)'):
        FinetuneConfig(method='rko', lambda_retrieved=1.0, retrieved_undesirable_share=1.0)


@pytest.mark.parametrize('method', ['rko', 'dpo'])
def test_preference_interval_scores_the_method_at_high_noise_and_anchors_everywhere(pretrained, method):
    store, parent, data, windows = pretrained
    policy = store.load_policy(parent)
    cfg = FinetuneConfig(method=method, batch_size=32, lambda_sft=1.0, preference_min_timestep=60,
                         seed=3)
    trainer = PreferenceTrainer(policy, data, cfg, progress=False)
    seen = []
    hooks = [m.unet.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
             for m in (trainer.policy, trainer.reference)]
    for _ in range(3):
        trainer.loss()
    for h in hooks:
        h.remove()
    # Per loss: the reference and the policy on the method's batch (t >= 60), then the anchor's
    # fresh pass over the desirable samples, whose t covers the whole range.
    method_t = torch.cat([t for i, t in enumerate(seen) if i % 3 < 2])
    anchor_t = torch.cat([t for i, t in enumerate(seen) if i % 3 == 2])
    assert len(seen) == 9 and int(method_t.min()) >= 60
    assert int(anchor_t.min()) < 60 and int(anchor_t.max()) >= 60
    with pytest.raises(TrainingError, match='preference_min_timestep=100 leaves no timestep'):
        PreferenceTrainer(policy, data, FinetuneConfig(method=method, preference_min_timestep=100),
                          progress=False)
    with pytest.raises(TrainingError, match='preference_min_timestep=-1'):
        FinetuneConfig(method=method, preference_min_timestep=-1)


def test_labels_problem_is_the_rule_the_demo_and_trainer_share():
    from rko_ros.alignment.trainer import labels_problem
    assert 'no labelled episodes' in labels_problem('rko', 0, 0)
    assert labels_problem('sft', 1, 0) is None
    assert labels_problem('sft', 0, 5) == 'sft needs desirable episodes; none is labelled good'
    assert 'no undesirable (bad) one (3 good, 0 bad)' in labels_problem('kto', 3, 0)
    assert 'no desirable (good) one (0 good, 4 bad)' in labels_problem('rko', 0, 4)
    assert labels_problem('rko', 1, 1) is None


def test_training_batches_shift_like_the_parents_pretraining_and_evaluation_does_not(pretrained):
    store, parent, data, windows = pretrained
    policy = store.load_policy(parent)
    policy.config.train = dataclasses.replace(policy.config.train, shift_px=3)
    inherit = PreferenceTrainer(policy, data, FinetuneConfig(steps=2, batch_size=16), progress=False)
    assert inherit.augment is not None and inherit.augment.shift_px == 3
    idx = np.arange(16)
    shifted = inherit._batch(idx)['images'].numpy()
    plain = data.windows.images[idx]
    assert shifted.shape == plain.shape and not np.array_equal(shifted, plain)
    # Held-out scoring reads the windows as recorded: the same margin twice, shift or not.
    off = PreferenceTrainer(store.load_policy(parent), data, FinetuneConfig(steps=2, batch_size=16),
                            progress=False)
    assert off.augment is None
    np.testing.assert_array_equal(off._batch(idx)['images'].numpy(), plain)
    assert inherit.holdout_margin() == pytest.approx(inherit.holdout_margin())
    none = PreferenceTrainer(policy, data, FinetuneConfig(steps=2, batch_size=16, shift_px=0),
                             progress=False)
    assert none.augment is None
    with pytest.raises(TrainingError, match='shift_px=40'):
        FinetuneConfig(shift_px=40)


def test_retrieval_anchor_draws_the_event_windows_as_the_parent_was_pretrained(pretrained):
    from rko_ros.policy.train import ArrayWindows
    store, parent, data, _ = pretrained
    config = store.load_policy(parent).config
    demo_modes = np.repeat(np.arange(24) % 2, 6)
    demos, _ = make_two_mode_windows(config, n=len(demo_modes), modes=demo_modes, seed=5)
    action = demos.action.copy()
    action[:, :, 2] = 0.0
    action[::3, 4:, 2] = 1.0          # every third window closes the gripper at its 5th action
    behaviour = ArrayWindows(demos.images, demos.state, action, np.arange(len(demo_modes)) // 6)
    # No reach test: these demonstrations' gripper column is unlike the labelled windows'.
    cfg = FinetuneConfig(method='rko', steps=2, batch_size=8, lambda_retrieved=2.0, seed=3,
                         retrieval_reach=0)

    def trainer(event_weight=None, parent_weight=3.0, event_action='gripper_closed'):
        # event_weight None: the parent's train.event_weight (the default, 1, draws uniformly)
        policy = store.load_policy(parent)
        policy.config.train = dataclasses.replace(policy.config.train, event_action=event_action,
                                                  event_weight=parent_weight)
        return PreferenceTrainer(policy, data, dataclasses.replace(cfg, event_weight=event_weight),
                                 behaviour=behaviour, progress=False)

    assert FinetuneConfig().event_weight == 1.0
    # None: the parent's own weight (3); the retrieval summary says how many windows it marks.
    inherit = trainer()
    events = np.zeros(len(demo_modes), bool)
    events[::3] = True
    retrieved = inherit.retrieved
    n_events = int(events[retrieved].sum())
    assert len(retrieved) == 72 and 0 < n_events < len(retrieved)     # the 12 RIGHT episodes
    assert inherit.retrieval['event_windows'] == n_events and inherit.retrieval['event_weight'] == 3.0
    drawn = inherit._draw_retrieved(20000)
    assert set(drawn.tolist()) <= set(retrieved.tolist())
    expected = 3 * n_events / (3 * n_events + len(retrieved) - n_events)
    assert abs(events[drawn].mean() - expected) < 0.02, (events[drawn].mean(), expected)
    assert 'retrieved_anchor' in inherit.loss()[1]
    # An explicit weight overrides the parent's; 1 draws every retrieved window alike, as before.
    assert trainer(event_weight=5.0).retrieval['event_weight'] == 5.0
    uniform = trainer(event_weight=1.0)
    assert uniform.retrieved_p is None and 'event_windows' not in uniform.retrieval
    assert abs(events[uniform._draw_retrieved(20000)].mean() - n_events / len(retrieved)) < 0.02
    assert trainer(parent_weight=1.0, event_action='').retrieved_p is None
    # Retrieved demonstrations whose gripper never switches: every window alike, no error.
    behaviour.action[:, :, 2] = 0.0
    still = trainer()
    assert still.retrieved_p is None and still.retrieval['event_windows'] == 0
    with pytest.raises(TrainingError, match="needs the parent model's train.event_action"):
        trainer(event_weight=3.0, parent_weight=1.0, event_action='')
    with pytest.raises(TrainingError, match='event_weight=0.5 must be 1..100'):
        FinetuneConfig(event_weight=0.5)
    with pytest.raises(TrainingError, match='event_weight=3.0 weights the retrieval anchor'):
        FinetuneConfig(event_weight=3.0)
    assert FinetuneConfig(event_weight=None).event_weight is None     # the parent's, anchor or not
