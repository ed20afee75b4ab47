"""The diffusion policy core: ONNX == PyTorch, torch-free runtime, real multi-modality, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from rko_ros import cli
from rko_ros.errors import ConfigError, ModelFileError, PolicyInputError, TrainingError
from rko_ros.policy.checkpoint import load_checkpoint, save_checkpoint
from rko_ros.policy.config import PolicyConfig
from rko_ros.policy.model import DiffusionPolicy
from rko_ros.policy.runtime import PolicyRuntime, coherent_choice
from rko_ros.policy.store import ModelStore
from rko_ros.policy.synthetic import LEFT, RIGHT, make_two_mode_windows, mode_of, mode_trajectory
from rko_ros.policy.train import (ArrayWindows, EagerBCStep, ShiftAugment, bf16_native, collate,
                                   event_windows, train_bc, window_sampler)

TINY = {'obs': {'image_size_px': [32, 32]},
        'model': {'encoder_channels': [8, 16], 'feature_dim': 16, 'down_dims': [32, 64],
                  'diffusion_step_embed_dim': 32},
        'train': {'steps': 500, 'batch_size': 32, 'lr': 1e-3, 'warmup_steps': 20, 'num_threads': 1}}


def tiny_config(**overrides):
    data = {k: dict(v) for k, v in TINY.items()}
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return PolicyConfig.from_dict(data)


@pytest.fixture(scope='module')
def store_with_model(tmp_path_factory):
    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_config()).eval()
    windows, _ = make_two_mode_windows(policy.config, n=16)
    policy.fit_normalizer(windows.state.reshape(-1, 3), windows.action.reshape(-1, 3))
    store = ModelStore(tmp_path_factory.mktemp('data'))
    version = store.write_version(policy, method='pretrain', activate=True)
    return store, version, policy


def _inputs(card, batch=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = lambda name: [s for s in next(i for i in card['inputs'] if i['name'] == name)['shape'][1:]]
    lead = [batch] if batch else []
    images = rng.integers(0, 256, lead + shape('images'), dtype=np.uint8)
    state = rng.standard_normal(lead + shape('state')).astype(np.float32)
    noise = rng.standard_normal(lead + shape('noise')).astype(np.float32)
    return images, state, noise


def test_onnx_runtime_matches_pytorch(store_with_model):
    store, version, policy = store_with_model
    runtime = PolicyRuntime(store.version_dir(version))
    assert runtime.provider == 'CPUExecutionProvider'
    images, state, noise = _inputs(runtime.card, batch=3)
    ort_actions = runtime.predict(images, state, noise)
    with torch.no_grad():
        torch_actions = policy.sample(torch.as_tensor(images), torch.as_tensor(state),
                                      torch.as_tensor(noise)).numpy()
    assert ort_actions.shape == (3, 16, 3)
    assert np.abs(ort_actions - torch_actions).max() < 1e-4
    # Unbatched call gives the same first chunk; another noise gives another chunk.
    single = runtime.predict(images[0], state[0], noise[0])
    assert np.abs(single - ort_actions[0]).max() < 1e-5
    assert np.abs(runtime.predict(images[0], state[0], noise[1]) - single).max() > 1e-3


def test_noise_scale_scales_the_drawn_noise_and_zero_makes_chunks_deterministic(store_with_model):
    store, version, _ = store_with_model
    runtime = PolicyRuntime(store.version_dir(version))
    images, state, _ = _inputs(runtime.card)
    drawn = np.random.default_rng(5).standard_normal((1, 16, 3)).astype(np.float32)[0]
    half = runtime.predict(images, state, seed=5, noise_scale=0.5)
    assert np.abs(half - runtime.predict(images, state, 0.5 * drawn)).max() < 1e-6
    assert np.abs(half - runtime.predict(images, state, seed=5)).max() > 1e-3
    zero = [runtime.predict(images, state, seed=s, noise_scale=0.0) for s in (1, 2)]
    assert np.abs(zero[0] - zero[1]).max() == 0.0
    assert np.abs(zero[0] - runtime.predict(images, state, np.zeros_like(drawn))).max() < 1e-6
    with pytest.raises(ConfigError, match='noise_scale=-0.1 must be 0..2'):
        runtime.predict(images, state, noise_scale=-0.1)
    with pytest.raises(PolicyInputError, match='noise_scale=0.5 with noise passed in'):
        runtime.predict(images, state, drawn, noise_scale=0.5)   # never silently ignored


def test_coherent_choice_keeps_the_candidate_nearest_the_plan_in_normalised_units():
    plan = np.zeros((1, 4, 2), np.float32)
    chunks = np.zeros((1, 3, 6, 2), np.float32)
    chunks[0, 0, :, 0] = 0.05          # off by 5 cm in x
    chunks[0, 1, :, 1] = 0.5           # gripper half open
    chunks[0, 2, :4, 0] = 0.3          # off by 30 cm, but only over the plan's 4 steps
    chunks[0, 2, 4:, :] = 9.0          # what lies past the plan does not count
    assert coherent_choice(chunks, plan).tolist() == [0]
    # Metres count 10x more (a 0.2 m range against a 0..1 gripper): now the gripper is nearer.
    assert coherent_choice(chunks, plan, scale=np.array([10.0, 0.1])).tolist() == [1]
    assert coherent_choice(chunks, None).tolist() == [0]          # no plan yet: the first draw
    batch = np.concatenate([chunks, chunks[:, ::-1]])
    assert coherent_choice(batch, np.concatenate([plan, plan])).tolist() == [0, 2]


def test_predict_coherent_picks_the_draw_that_continues_the_plan(store_with_model):
    store, version, policy = store_with_model
    runtime = PolicyRuntime(store.version_dir(version))
    lo, hi = policy.action_normalizer.lo.numpy(), policy.action_normalizer.hi.numpy()
    np.testing.assert_allclose(runtime.card['action_range'], np.stack([lo, hi], 1), rtol=1e-6)
    np.testing.assert_allclose(runtime.action_scale, 2 / (hi - lo), rtol=1e-5)
    images, state, _ = _inputs(runtime.card)
    noise = np.random.default_rng(1).standard_normal((4, 16, 3)).astype(np.float32)
    each = [runtime.predict(images, state, n) for n in noise]
    for j in (0, 2, 3):
        actions, index = runtime.predict_coherent(images, state, each[j][:8], 4, noise)
        assert index == j and np.abs(actions - each[j]).max() < 1e-5
    # No plan: the first draw, and with a seed the very chunk predict(seed=) gives.
    actions, index = runtime.predict_coherent(images, state, None, 4, seed=7)
    assert index == 0 and np.abs(actions - runtime.predict(images, state, seed=7)).max() < 1e-5
    # Batched: each observation gets its own pick.
    b_images, b_state = np.stack([images] * 2), np.stack([state] * 2)
    plans = np.stack([each[3][:8], each[1][:8]])
    actions, index = runtime.predict_coherent(b_images, b_state, plans, 4, np.stack([noise] * 2))
    assert index.tolist() == [3, 1] and np.abs(actions[1] - each[1]).max() < 1e-5
    with pytest.raises(ConfigError, match='chunk_candidates=0 must be an integer 1..32'):
        runtime.predict_coherent(images, state, None, 0)
    with pytest.raises(PolicyInputError, match='expected 3 candidates'):
        runtime.predict_coherent(images, state, None, 3, noise)
    with pytest.raises(PolicyInputError, match='previous plan: got shape'):
        runtime.predict_coherent(images, state, np.zeros((8, 2), np.float32), 4, noise)
    with pytest.raises(PolicyInputError, match='previous plan holds NaN'):
        runtime.predict_coherent(images, state, np.full((8, 3), np.nan, np.float32), 4, noise)
    with pytest.raises(ConfigError, match="chunk_candidates=four must be an integer"):
        runtime.predict_coherent(images, state, None, 'four')


def test_coherent_chunks_stay_in_the_mode_the_plan_follows(tmp_path):
    """On the two-mode task a new chunk is LEFT or RIGHT at random; with 8 candidates the one
    kept continues the plan in hand, in whichever mode that plan is."""
    torch.manual_seed(0)
    cfg = tiny_config()
    windows, _ = make_two_mode_windows(cfg, n=256)
    ema, _ = train_bc(DiffusionPolicy(cfg), windows, progress=False)
    store = ModelStore(tmp_path)
    runtime = PolicyRuntime(store.version_dir(store.write_version(ema, method='pretrain')))
    images, state = windows.images[:32], windows.state[:32]
    for mode in (LEFT, RIGHT):
        plan = np.stack([mode_trajectory(mode, 16, 3)[:8]] * 32)
        one, _ = runtime.predict_coherent(images, state, plan, 1, seed=1)
        assert 0.2 <= (mode_of(one) == mode).mean() <= 0.8       # one draw: either mode
        actions, _ = runtime.predict_coherent(images, state, plan, 16, seed=1)
        assert (mode_of(actions) == mode).mean() >= 0.95


def test_runtime_works_without_torch(store_with_model):
    store, version, _ = store_with_model
    code = (
        'import sys; sys.modules["torch"] = None\n'
        'import numpy as np\n'
        'from rko_ros.policy.runtime import PolicyRuntime\n'
        f'rt = PolicyRuntime({store.version_dir(version)!r})\n'
        'out = rt.predict(np.zeros((2, 1, 3, 32, 32), np.uint8), np.zeros((2, 3), np.float32), seed=1)\n'
        'assert "torch" not in sys.modules or sys.modules["torch"] is None\n'
        'print(out.shape, rt.provider)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '(16, 3) CPUExecutionProvider' in result.stdout


def test_rko_train_synthetic_reproduces_both_modes(tmp_path):
    config_path = tmp_path / 'tiny.yaml'
    config_path.write_text(yaml.safe_dump(TINY))
    checkpoint = tmp_path / 'synthetic.pt'
    assert cli.main(['train', '--synthetic', '--config', str(config_path), '--out', str(checkpoint),
                     '--no-progress', '--json']) == 0
    policy = load_checkpoint(str(checkpoint))
    windows, _ = make_two_mode_windows(policy.config, n=64)
    with torch.no_grad():
        actions = policy.sample(torch.as_tensor(windows.images), torch.as_tensor(windows.state),
                                torch.randn(64, 16, 3, generator=torch.Generator().manual_seed(3))).numpy()
    counts = np.bincount(mode_of(actions), minlength=2)
    # Both modes, each with a substantial share: a unimodal regressor would give one averaged mode.
    assert counts.min() >= 16, counts
    # And the samples are real modes (end near +-0.5), not the average (0).
    assert np.abs(np.abs(actions[:, -1, 0]) - 0.5).mean() < 0.2


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / 'checkpoint.pt'
    save_checkpoint(str(path), DiffusionPolicy(tiny_config()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match='corrupt or truncated'):
        load_checkpoint(str(path))
    with pytest.raises(ModelFileError, match='does not exist'):
        load_checkpoint(str(tmp_path / 'missing.pt'))


def test_onnx_file_not_matching_card_is_refused(store_with_model, tmp_path):
    store, version, _ = store_with_model
    source = store.version_dir(version)
    tampered = tmp_path / 'tampered'
    tampered.mkdir()
    (tampered / 'policy.onnx').write_bytes(open(os.path.join(source, 'policy.onnx'), 'rb').read() + b'x')
    (tampered / 'card.yaml').write_text(open(os.path.join(source, 'card.yaml')).read())
    with pytest.raises(ModelFileError, match='sha256'):
        PolicyRuntime(str(tampered))
    # A card from another model (other image size) with a matching hash: the graph check catches it.
    card = yaml.safe_load(open(os.path.join(source, 'card.yaml')))
    card['inputs'][0]['shape'][-1] = 48
    (tampered / 'policy.onnx').write_bytes(open(os.path.join(source, 'policy.onnx'), 'rb').read())
    (tampered / 'card.yaml').write_text(yaml.safe_dump(card))
    with pytest.raises(ModelFileError, match="input 'images'"):
        PolicyRuntime(str(tampered))
    runtime = PolicyRuntime(source)
    with pytest.raises(ModelFileError, match='camera order'):
        runtime.check_matches(camera_names=['left', 'right'])
    with pytest.raises(ModelFileError, match='state joints'):
        runtime.check_matches(joint_names=['a', 'b', 'c'])


def test_bad_inputs_are_refused_with_the_fix(store_with_model):
    store, version, _ = store_with_model
    runtime = PolicyRuntime(store.version_dir(version))
    images, state, noise = _inputs(runtime.card)
    with pytest.raises(PolicyInputError, match=r'images: got shape \(2, 1, 3, 32, 48\).*image_size_px'):
        runtime.predict(np.zeros((2, 1, 3, 32, 48), np.uint8), state)
    with pytest.raises(PolicyInputError, match='images: got dtype float32.*uint8'):
        runtime.predict(images.astype(np.float32), state)
    bad_state = state.copy()
    bad_state[1, 2] = np.nan
    with pytest.raises(PolicyInputError, match=r'state: holds NaN.*\(1, 2\)'):
        runtime.predict(images, bad_state)
    with pytest.raises(PolicyInputError, match='state: got shape'):
        runtime.predict(images, state[:, :2])


def test_store_write_is_atomic(store_with_model, monkeypatch):
    store, version, policy = store_with_model
    before = store.versions()

    def explode(*args, **kwargs):
        raise RuntimeError('disk on fire')
    monkeypatch.setattr('rko_ros.policy.export.export_onnx', explode)
    with pytest.raises(RuntimeError):
        store.write_version(policy, parent=version, method='rko', activate=True)
    assert store.versions() == before
    assert store.active_version() == version
    assert not [n for n in os.listdir(store.models_dir) if n.startswith('.incoming')]
    with pytest.raises(ModelFileError, match="version 'v9999-x' does not exist"):
        store.version_dir('v9999-x')


def test_config_validation_names_field_and_value():
    with pytest.raises(ConfigError, match='n_obs_steps=0'):
        PolicyConfig.preset('small', obs={'n_obs_steps': 0})
    with pytest.raises(ConfigError, match='n_action_steps=20'):
        PolicyConfig.preset('small', action={'n_action_steps': 20})
    with pytest.raises(ConfigError, match="unknown keys \\['colour'\\]"):
        PolicyConfig.from_dict({'obs': {'colour': 1}})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        PolicyConfig.preset('huge')
    round_trip = PolicyConfig.from_dict(PolicyConfig.preset('default').to_dict())
    assert round_trip == PolicyConfig.preset('default')
    with pytest.raises(ConfigError, match='encoder_strides=\\(1, 2\\) needs one stride'):
        PolicyConfig.preset('small', model={'encoder_strides': [1, 2]})


def test_encoder_strides_set_the_keypoint_resolution_and_survive_a_checkpoint(tmp_path):
    image = torch.zeros(1, 3, 64, 64)
    default = DiffusionPolicy(PolicyConfig.preset('small'))
    assert default.encoders[0].trunk(image).shape[-2:] == (8, 8)     # stem /2, stages 1, 2, 2
    fine_cfg = PolicyConfig.preset('small', model={'encoder_strides': [1, 2, 1]})
    fine = DiffusionPolicy(fine_cfg)
    assert fine.encoders[0].trunk(image).shape[-2:] == (16, 16)
    assert fine.num_parameters() == default.num_parameters()         # same weights, finer map
    save_checkpoint(str(tmp_path / 'c.pt'), fine)
    loaded = load_checkpoint(str(tmp_path / 'c.pt'))
    assert loaded.config.model.encoder_strides == (1, 2, 1)
    assert loaded.encoders[0].trunk(image).shape[-2:] == (16, 16)


def test_shift_augment_moves_images_and_tied_positions_together():
    cfg = PolicyConfig.preset('small', obs={'image_size_px': [16, 16]},
                              train={'shift_px': 2, 'shift_joints': {
                                  'gripper_x': ['col', 0.01], 'gripper_y': ['row', -0.01]}})
    augment = ShiftAugment.from_config(cfg)
    image = np.zeros((1, 1, 1, 3, 16, 16), np.uint8)
    image[..., 5, 7] = 200                                    # one bright pixel at row 5, col 7
    state = np.array([[[0.1, 0.2, 1.0]]], np.float32)         # (B, To, S) x, y, closed
    action = np.tile(np.array([0.3, -0.1, 0.0], np.float32), (1, 4, 1))
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(40):
        out = augment({'images': image, 'state': state, 'action': action}, rng)
        rows, cols = np.nonzero(out['images'][0, 0, 0, 0])
        dr, dc = int(rows[0]) - 5, int(cols[0]) - 7
        seen.add((dr, dc))
        assert abs(dr) <= 2 and abs(dc) <= 2 and len(rows) == 1
        np.testing.assert_allclose(out['state'][0, 0], [0.1 + 0.01 * dc, 0.2 - 0.01 * dr, 1.0],
                                   atol=1e-6)
        np.testing.assert_allclose(out['action'][0, :, 0], 0.3 + 0.01 * dc, atol=1e-6)
        np.testing.assert_allclose(out['action'][0, :, 1], -0.1 - 0.01 * dr, atol=1e-6)
        assert (out['action'][0, :, 2] == 0).all()
    assert len(seen) > 10                                     # many of the 25 shifts drawn
    widened_states, widened_actions = augment.widen(state[0], action[0])
    assert widened_states[:, 0].min() == pytest.approx(0.08) and widened_states[:, 0].max() == pytest.approx(0.12)
    assert widened_actions[:, 1].min() == pytest.approx(-0.12)
    assert ShiftAugment.from_config(PolicyConfig.preset('small')) is None
    with pytest.raises(ConfigError, match=r"shift_joints\['gripper_x'\]"):
        PolicyConfig.preset('small', train={'shift_px': 2, 'shift_joints': {'gripper_x': ['z', 1]}})
    with pytest.raises(ConfigError, match=r"names \['elbow'\]"):
        PolicyConfig.preset('small', train={'shift_joints': {'elbow': ['col', 0.01]}})
    with pytest.raises(ConfigError, match='shift_px=40'):
        PolicyConfig.preset('small', train={'shift_px': 40})


def test_bench_inference_prints_json(capsys):
    from rko_ros.policy.commands import bench_inference
    result = bench_inference('small', repeats=2)
    for key in ('ort_ms', 'ort_batch1_ms', 'torch_ms', 'max_abs_diff', 'provider', 'params'):
        assert key in result
    assert result['max_abs_diff'] < 1e-4
    assert result['max_abs_diff_by_engine']['ort_batch1'] == 0.0
    json.dumps(result)


def test_batch_one_runtime_folds_shapes_and_matches(store_with_model, tmp_path):
    """batch_size=1 (what a CUDA graph needs): the shape arithmetic of the dynamic-batch graph
    is folded away, bound buffers give the same actions, other batches are refused."""
    import onnx
    import onnxruntime as ort
    store, version, _ = store_with_model
    plain = PolicyRuntime(store.version_dir(version))
    fixed = PolicyRuntime(store.version_dir(version), batch_size=1)
    for seed in range(3):
        images, state, noise = _inputs(plain.card, seed=seed)
        np.testing.assert_array_equal(fixed.predict(images, state, noise),
                                      plain.predict(images, state, noise))
    images, state, noise = _inputs(plain.card, batch=2)
    with pytest.raises(PolicyInputError, match='runs batch 1, got 2'):
        fixed.predict(images, state, noise)
    assert fixed.predict(images[:1], state[:1], noise[:1]).shape == (1, plain.horizon, 3)

    def optimized_ops(override):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f'opt{override}.onnx')
        if override:
            options.add_free_dimension_override_by_name('batch', 1)
        ort.InferenceSession(plain.onnx_path, options, providers=['CPUExecutionProvider'])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert optimized_ops(False).count('Shape') > 10
    assert optimized_ops(True).count('Shape') == 0


def test_cuda_graph_without_cuda_is_refused_clearly(store_with_model):
    store, version, _ = store_with_model
    with pytest.raises(ModelFileError, match='cuda_graph needs the CUDAExecutionProvider'):
        PolicyRuntime(store.version_dir(version), cuda_graph=True)
    with pytest.raises(ModelFileError, match='batch 1'):
        PolicyRuntime(store.version_dir(version), cuda_graph=True, batch_size=4)


def test_static_batch_export_loads_in_onnx_runtime(tmp_path):
    """A fixed-shape export constant-folds the spatial-softmax grid: it must stay float32 (a
    traced linspace folded to double, which ONNX Runtime's LayerNormalization refused)."""
    import warnings
    import onnxruntime as ort
    from rko_ros.policy.export import InferenceGraph
    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_config()).eval()
    images, state, noise = _inputs({'inputs': [
        {'name': 'images', 'shape': [1, 2, 1, 3, 32, 32]}, {'name': 'state', 'shape': [1, 2, 3]},
        {'name': 'noise', 'shape': [1, 16, 3]}]}, batch=1)
    args = tuple(torch.as_tensor(x) for x in (images, state, noise))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(InferenceGraph(policy), args, str(tmp_path / 'static.onnx'),
                          dynamo=False, input_names=['images', 'state', 'noise'],
                          output_names=['actions'], opset_version=17, do_constant_folding=True)
        expected = policy.sample(*args).numpy()
    session = ort.InferenceSession(str(tmp_path / 'static.onnx'), providers=['CPUExecutionProvider'])
    actions = session.run(None, {'images': images, 'state': state, 'noise': noise})[0]
    np.testing.assert_allclose(actions, expected, atol=1e-4)


def test_cuda_graph_training_needs_cuda():
    from rko_ros.errors import TrainingError
    from rko_ros.policy.train import train_bc
    policy = DiffusionPolicy(tiny_config(train={'steps': 2}))
    windows, _ = make_two_mode_windows(policy.config, n=8)
    with pytest.raises(TrainingError, match="cuda_graph needs a CUDA device, not 'cpu'"):
        train_bc(policy, windows, progress=False, cuda_graph=True)


def test_bench_train_times_steps_and_learns():
    from rko_ros.policy.commands import bench_train
    result = bench_train('small', steps=30)
    assert result['eager_ms_per_step'] > 0
    assert result['eager_final_loss'] < result['eager_first_loss']
    assert 'cuda_graph_ms_per_step' not in result  # no CUDA here: only the eager mode runs
    if bf16_native('cpu'):   # the same steps again under bf16 autocast
        assert result['eager_bf16_ms_per_step'] > 0 and result['bf16_speedup'] > 0
        assert result['eager_bf16_final_loss'] < result['eager_bf16_first_loss']
    else:
        assert 'eager_bf16_ms_per_step' not in result
    json.dumps(result)


def test_precision_is_checked_resolved_and_refused_where_bf16_is_not_native(monkeypatch):
    from rko_ros.errors import TrainingError
    from rko_ros.policy import train as train_mod
    with pytest.raises(ConfigError, match="train.precision='fp16' must be one of fp32, bf16, auto"):
        tiny_config(train={'precision': 'fp16'})
    assert train_mod.resolve_precision('fp32', 'cpu') == 'fp32'
    native = train_mod.bf16_native('cpu')
    assert train_mod.resolve_precision('auto', 'cpu') == ('bf16' if native else 'fp32')
    # A CPU without native bfloat16 (the check reads the CPU; here it is told so):
    monkeypatch.setattr(train_mod, 'bf16_native', lambda device: False)
    assert train_mod.resolve_precision('auto', 'cpu') == 'fp32'
    with pytest.raises(TrainingError, match="no native bfloat16.*use 'auto'"):
        train_mod.resolve_precision('bf16', 'cpu')
    policy = DiffusionPolicy(tiny_config(train={'steps': 2, 'precision': 'bf16'}))
    windows, _ = make_two_mode_windows(policy.config, n=8)
    with pytest.raises(TrainingError, match="train.precision='bf16' on 'cpu'"):
        train_bc(policy, windows, progress=False)


@pytest.mark.parametrize('chosen', ['fp32', 'bf16'])
def test_auto_precision_times_both_and_trains_as_the_chosen_one_would(monkeypatch, chosen):
    from rko_ros.policy import train as train_mod
    monkeypatch.setattr(train_mod, 'bf16_native', lambda device: True)   # timed on any CPU
    windows, _ = make_two_mode_windows(tiny_config(), n=32, seed=0)
    timed = {}
    real = train_mod.time_precisions

    def rigged(policy, windows, cfg, device, augment=None):
        # The real timing, then its verdict set to `chosen` (which is faster depends on the CPU).
        before = [p.detach().clone() for p in policy.parameters()]
        state = torch.get_rng_state()
        got, ms = real(policy, windows, cfg, device, augment, steps=2, warmup=1)
        assert got == ('bf16' if ms['bf16'] * train_mod.AUTO_BF16_MIN_SPEEDUP <= ms['fp32']
                       else 'fp32')
        assert set(ms) == {'fp32', 'bf16'} and min(ms.values()) > 0
        # The timing trained a throwaway copy: the weights and the random stream are untouched.
        assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
        assert torch.equal(state, torch.get_rng_state())
        timed.update(ms)
        return chosen, ms
    monkeypatch.setattr(train_mod, 'time_precisions', rigged)
    results = {}
    for precision in ('auto', chosen):
        torch.manual_seed(0)
        policy = DiffusionPolicy(tiny_config(train={'steps': 5, 'precision': precision}))
        ema, metrics = train_bc(policy, windows, progress=False)
        assert metrics['precision'] == chosen
        results[precision] = (metrics, [p.detach().clone() for p in ema.parameters()])
    assert results['auto'][0]['precision_ms'] == timed
    assert 'precision_ms' not in results[chosen][0]           # timed only for 'auto'
    # The same training, step for step, as asking for the chosen precision outright.
    assert results['auto'][0]['final_loss'] == results[chosen][0]['final_loss']
    assert all(torch.equal(a, b) for a, b in zip(results['auto'][1], results[chosen][1]))


@pytest.mark.skipif(not bf16_native('cpu'), reason='this CPU has no native bfloat16')
def test_bf16_training_runs_the_forward_in_bf16_and_keeps_float32_weights():
    windows, _ = make_two_mode_windows(tiny_config(), n=64, seed=0)
    results = {}
    for precision in ('fp32', 'bf16'):
        torch.manual_seed(0)
        policy = DiffusionPolicy(tiny_config(train={'steps': 60, 'precision': precision}))
        seen = set()   # the dtype of a convolution's output in every training step
        conv = next(m for m in policy.modules() if isinstance(m, torch.nn.Conv2d))
        handle = conv.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        ema, metrics = train_bc(policy, windows, progress=False)
        handle.remove()
        assert metrics['precision'] == precision
        assert seen == {torch.bfloat16 if precision == 'bf16' else torch.float32}
        assert all(p.dtype == torch.float32 for p in ema.parameters())
        assert metrics['final_loss'] < 0.5 * metrics['first_loss']
        results[precision] = metrics['final_loss']
    # Same data, seed and steps: bf16 learns about as far as fp32.
    assert results['bf16'] < 1.5 * results['fp32'], results


def test_bc_step_uses_the_fused_adamw_and_steps_as_the_plain_one_does():
    cfg = PolicyConfig.preset('small', obs={'image_size_px': [32, 32]})
    windows, _ = make_two_mode_windows(cfg, n=32, seed=0)
    rng = np.random.default_rng(0)
    batch = collate(windows, rng.integers(0, len(windows), size=8), 'cpu')
    params = {}
    for fused in (True, False):
        torch.manual_seed(0)
        policy = DiffusionPolicy(cfg)
        policy.fit_normalizer(np.concatenate([w['state'] for w in windows]),
                              np.concatenate([w['action'] for w in windows]))
        step = EagerBCStep(policy, policy, cfg.train, 'cpu')
        assert step.optimizer.defaults['fused'] is True
        if not fused:
            step.optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.train.lr,
                                               weight_decay=cfg.train.weight_decay)
        before = [p.detach().clone() for p in policy.parameters()]
        torch.manual_seed(1)    # the same timesteps and noise for both
        for _ in range(3):
            step(batch, 1e-3, 0.0)
        params[fused] = [p.detach().clone() for p in policy.parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(params[True], before))
    assert moved > 1e-4
    # Adam divides by sqrt(v): where a gradient is tiny, rounding moves an update by a few % of
    # one step. A wrong update (bias correction, weight decay) would be off by about lr per step.
    for a, b in zip(params[True], params[False]):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-4)


def _gripper_windows(closed_now, chunks):
    """ArrayWindows of 16x16 blank images whose newest observed gripper_closed is `closed_now[i]`
    and whose action chunk's gripper_closed column is `chunks[i]` (horizon 8)."""
    m = len(chunks)
    state = np.zeros((m, 1, 3), np.float32)
    state[:, 0, 2] = closed_now
    action = np.zeros((m, 8, 3), np.float32)
    action[:, :, 2] = np.asarray(chunks, np.float32)
    action[:, :, 0] = np.linspace(0, 1, 8)        # x moves: only gripper_closed marks events
    return ArrayWindows(np.zeros((m, 1, 1, 3, 16, 16), np.uint8), state, action)


def test_event_windows_are_those_where_the_gripper_switches_before_the_next_plan():
    cfg = PolicyConfig.preset('small', obs={'image_size_px': [16, 16], 'n_obs_steps': 1},
                              action={'horizon': 8, 'n_action_steps': 4},
                              train={'event_action': 'gripper_closed', 'event_weight': 3})
    o, c = 0, 1
    chunks = [[o] * 8,                       # carries on open: no event
              [o, o, o, c, c, c, c, c],      # closes at the 4th action, executed: event
              [o, o, o, o, c, c, c, c],      # closes at the 5th, after the next plan: no event
              [c] * 8,                       # observed open, commanded closed at once: event
              [c] * 8,                       # observed closed, stays closed: no event
              [c, c, o, o, o, o, o, o]]      # releases at the 3rd: event
    windows = _gripper_windows([o, o, o, o, c, c], chunks)
    np.testing.assert_array_equal(event_windows(cfg, windows),
                                  [False, True, False, True, False, True])
    # A gripper command in other units (a width in metres, closed = 0.0) is cut at its midpoint.
    width = ArrayWindows(windows.images, 0.08 * (1 - windows.state), windows.action.copy())
    width.action[:, :, 2] = 0.08 * (1 - windows.action[:, :, 2])
    np.testing.assert_array_equal(event_windows(cfg, width), event_windows(cfg, windows))
    # Off unless both are set; a constant command has no events to weight.
    plain = PolicyConfig.preset('small', obs={'image_size_px': [16, 16], 'n_obs_steps': 1},
                                action={'horizon': 8, 'n_action_steps': 4})
    assert event_windows(plain, windows) is None
    with pytest.raises(TrainingError, match="'gripper_closed' never changes"):
        event_windows(cfg, _gripper_windows([o, o], [[o] * 8, [o] * 8]))
    with pytest.raises(ConfigError, match='event_weight=3.0 needs train.event_action'):
        PolicyConfig.preset('small', train={'event_weight': 3})
    with pytest.raises(ConfigError, match="event_action='elbow' is not one of action.action_names"):
        PolicyConfig.preset('small', train={'event_action': 'elbow', 'event_weight': 3})
    with pytest.raises(ConfigError, match='event_weight=0.5 must be 1..100'):
        PolicyConfig.preset('small', train={'event_action': 'gripper_closed', 'event_weight': 0.5})


def test_window_sampler_weights_event_windows_and_leaves_uniform_draws_as_they_were():
    events = np.zeros(300, bool)
    events[:100] = True                               # a third of the windows
    draw = window_sampler(300, 64, np.random.default_rng(1), events, 3.0)
    drawn = np.concatenate([draw() for _ in range(400)])
    assert drawn.min() >= 0 and drawn.max() < 300
    share = events[drawn].mean()                      # 3 x 100 / (3 x 100 + 200) = 0.6
    assert abs(share - 0.6) < 0.01, share
    counts = np.bincount(drawn, minlength=300)
    assert counts[:100].mean() == pytest.approx(3 * counts[100:].mean(), rel=0.05)
    # No events: exactly rng.integers' draws, so default training is bit for bit as before.
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    uniform = window_sampler(300, 64, a)
    for _ in range(3):
        np.testing.assert_array_equal(uniform(), b.integers(0, 300, size=64))


def test_train_bc_with_event_weight_reports_the_event_windows_and_learns(tmp_path, capsys):
    cfg = tiny_config(obs={'image_size_px': [16, 16], 'n_obs_steps': 1},
                      action={'horizon': 8, 'n_action_steps': 4},
                      train={'steps': 40, 'batch_size': 16, 'event_action': 'gripper_closed',
                             'event_weight': 4})
    o, c = 0, 1
    chunks = [[o] * 8, [o, o, c, c, c, c, c, c], [c] * 8, [c, c, c, o, o, o, o, o]] * 8
    windows = _gripper_windows([o, o, c, c] * 8, chunks)
    torch.manual_seed(0)
    ema, metrics = train_bc(DiffusionPolicy(cfg), windows, progress=False)
    assert metrics['event_windows'] == 16 and metrics['event_weight'] == 4.0
    assert metrics['final_loss'] < metrics['first_loss']
    # `rko train` takes both from its flags, checked as the config file's would be.
    config_path = tmp_path / 'tiny.yaml'
    config_path.write_text(yaml.safe_dump(TINY))
    assert cli.main(['train', '--synthetic', '--config', str(config_path), '--out',
                     str(tmp_path / 'c.pt'), '--event-weight', '3', '--no-progress']) == 2
    assert 'event_weight=3.0 needs train.event_action' in capsys.readouterr().err
