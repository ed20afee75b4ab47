"""`rko train`, `rko export`, `rko bench inference`, `rko bench train`. Heavy imports stay inside the handlers."""
import json
import os
import sys

from rko_ros.errors import RkoError
from rko_ros.policy.config import PRECISIONS


def _default_data_dir():
    return os.environ.get('RKO_DATA_DIR', 'data')


def register(subparsers):
    p = subparsers.add_parser(
        'train', help='behaviour-cloning pretraining of the diffusion policy',
        description='Pretrain the diffusion policy on recorded episodes (--data-dir: every complete '
                    'episode in the catalog) or on the built-in synthetic two-mode task '
                    '(--synthetic). Writes a new model version (checkpoint + ONNX + card) into '
                    'DATA_DIR/models and activates it, or a single checkpoint to --out.')
    p.add_argument('--preset', default='small', choices=['small', 'default'],
                   help='model size preset (default: small, the CPU demo size)')
    p.add_argument('--config', help='policy config YAML (overrides --preset)')
    p.add_argument('--synthetic', action='store_true', help='train on the synthetic two-mode task')
    p.add_argument('--data-dir', default=_default_data_dir(),
                   help='data directory with catalog.sqlite, episodes/ and models/ '
                        '(default: $RKO_DATA_DIR or ./data)')
    p.add_argument('--camera-topics', nargs='+', default=['camera/image_raw'],
                   help='bag topics of the cameras, in config camera order')
    p.add_argument('--steps', type=int, help='training steps (default from the config)')
    p.add_argument('--batch-size', type=int, help='batch size (default from the config)')
    p.add_argument('--out', help='write only a checkpoint here instead of a model version')
    p.add_argument('--device', default='cpu',
                   help="torch device to train on, e.g. 'cuda' (default cpu); the written model is "
                        'the same either way')
    p.add_argument('--no-cuda-graph', action='store_true',
                   help='on a CUDA device, run every step eagerly instead of replaying one '
                        'captured CUDA graph per step (6.6x slower for the demo policy on an H100; '
                        'for debugging)')
    p.add_argument('--precision', choices=PRECISIONS,
                   help='arithmetic of the forward pass (default from the config, fp32): bf16 '
                        'autocast (weights, optimizer and written model stay float32), or auto = '
                        'on a CPU with native bfloat16 (AVX512-BF16 or AMX) the faster of fp32 '
                        'and bf16, timed on a few steps before training (2 s), fp32 elsewhere. '
                        '`rko bench train` shows both on this machine')
    p.add_argument('--event-action', metavar='NAME',
                   help='a binary action (the gripper command) whose switches mark the event '
                        'windows: those where it closes or opens before the next plan '
                        '(train.event_action; default from the config, none)')
    p.add_argument('--event-weight', type=float, metavar='K',
                   help='draw the event windows K times as often as the others (train.event_weight; '
                        'default from the config, 1 = every window alike; the cloth demo uses 3)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--json', action='store_true', help='print one JSON line with the result')
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        'export', help='export a checkpoint to ONNX (policy.onnx + card.yaml)',
        description='Export the whole inference (normalisation + encoders + DDIM loop) of a '
                    'checkpoint to one ONNX graph with inputs images/state/noise and output actions, '
                    'and write card.yaml beside it.')
    p.add_argument('checkpoint', help='checkpoint.pt written by `rko train`')
    p.add_argument('--out', required=True, help='output folder')
    p.set_defaults(func=_export)


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        'inference', help='ONNX Runtime vs PyTorch eager, one action chunk',
        description='Times one full action chunk (encoders + DDIM loop) with ONNX Runtime and with '
                    'PyTorch eager on the same weights and noise, in the same process; median of '
                    'repeated runs. Target: ORT faster than eager; on a GPU under 10 ms per chunk.')
    p.add_argument('--preset', default='small', choices=['small', 'default'])
    p.add_argument('--repeats', type=int, default=30, help='timed runs per engine (default 30)')
    p.add_argument('--device', default='cpu', help="torch device for the eager side (e.g. 'cuda')")
    p.add_argument('--providers', default=None,
                   help='comma-separated ONNX Runtime execution providers in order of preference '
                        '(e.g. CUDAExecutionProvider,CPUExecutionProvider); default: the fastest '
                        'present (TensorRT, CUDA, CPU)')
    p.add_argument('--candidates', type=int, default=4,
                   help='also time a coherent chunk of this many draws in one batched call, as '
                        'policy_node chunk_candidates runs it (default 4; 1 = skip)')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    p.set_defaults(func=_bench_inference)

    p = bench_subparsers.add_parser(
        'train', help='BC training steps: eager, and on a GPU one CUDA graph per step',
        description='Times behaviour-cloning steps on synthetic windows of the preset\'s sizes '
                    '(`cloth`: the demo\'s policy, 48x48 images, batch 64): eager PyTorch, and on a '
                    'CUDA device the same step captured once in a CUDA graph and replayed (what '
                    '`rko train --device cuda` uses); each again under bf16 autocast where the '
                    'device has native bfloat16 (train.precision). Median ms per step after the '
                    'first 20, and the loss each reaches.')
    p.add_argument('--preset', default='cloth', choices=['small', 'default', 'cloth'])
    p.add_argument('--steps', type=int, default=200, help='steps per mode (default 200)')
    p.add_argument('--device', default='cpu', help="torch device (e.g. 'cuda')")
    p.add_argument('--json', action='store_true', help='print one JSON line')
    p.set_defaults(func=_bench_train)


def _train(args):
    import numpy as np
    from rko_ros.policy.config import PolicyConfig
    from rko_ros.policy.model import DiffusionPolicy
    from rko_ros.policy.train import check_device, resolve_precision, train_bc

    device = check_device(args.device)   # before loading any bag
    cfg = PolicyConfig.from_yaml(args.config) if args.config else PolicyConfig.preset(args.preset)
    if args.precision:
        cfg.train.precision = args.precision
    resolve_precision(cfg.train.precision, device)   # bf16 where there is none: said now
    if args.steps:
        cfg.train.steps = args.steps
    if args.batch_size:
        cfg.train.batch_size = args.batch_size
    if args.event_action is not None or args.event_weight is not None:
        train = cfg.to_dict()['train']
        train.update({k: v for k, v in (('event_action', args.event_action),
                                        ('event_weight', args.event_weight)) if v is not None})
        cfg = PolicyConfig.from_dict({**cfg.to_dict(), 'train': train})   # checked as in a YAML
    episode_ids = []
    if args.synthetic:
        from rko_ros.policy.synthetic import make_two_mode_windows
        windows, _ = make_two_mode_windows(cfg, n=256, seed=cfg.train.seed)
    else:
        try:
            from rko_ros.episodes.catalog import Catalog
            from rko_ros.episodes.dataset import WindowSpec, load_windows
        except ImportError as exc:
            raise RkoError(f'training from bags needs rko_ros.episodes ({exc})') from exc
        catalog = Catalog(args.data_dir)
        episode_ids = [e['id'] for e in catalog.list() if e.get('complete')]
        if not episode_ids:
            raise RkoError(f'no complete episodes in {args.data_dir}; record some or use --synthetic')
        spec = WindowSpec.from_config(cfg, {'cameras': args.camera_topics})
        windows = load_windows(args.data_dir, episode_ids, spec, progress=not args.no_progress)
    policy = DiffusionPolicy(cfg)
    ema, metrics = train_bc(policy, windows, progress=not args.no_progress, device=device,
                            cuda_graph=False if args.no_cuda_graph else None)
    if args.out:
        from rko_ros.policy.checkpoint import save_checkpoint
        save_checkpoint(args.out, ema, extra={'metrics': metrics})
        result = {'checkpoint': os.path.abspath(args.out), **metrics}
    else:
        from rko_ros.policy.store import ModelStore
        store = ModelStore(args.data_dir)
        version = store.write_version(ema, parent=None, method='pretrain', activate=True,
                                      card_extra={'metrics': metrics, 'episodes': episode_ids,
                                                  'synthetic': bool(args.synthetic)})
        result = {'version': version, 'model_dir': store.version_dir(version), **metrics}
    print(json.dumps(result) if args.json else
          '\n'.join(f'{k}: {v}' for k, v in result.items() if k != 'episodes'))
    return 0


def _export(args):
    from rko_ros.policy.checkpoint import load_checkpoint
    from rko_ros.policy.export import export_onnx, write_card
    policy = load_checkpoint(args.checkpoint)
    os.makedirs(args.out, exist_ok=True)
    card = export_onnx(policy, os.path.join(args.out, 'policy.onnx'),
                       version=os.path.basename(os.path.abspath(args.out)),
                       source_checkpoint=os.path.abspath(args.checkpoint))
    write_card(os.path.join(args.out, 'card.yaml'), card)
    print(f"wrote {os.path.join(args.out, 'policy.onnx')} and card.yaml "
          f"(sha256 {card['onnx_sha256'][:12]}...)")
    return 0


def bench_inference(preset='small', repeats=30, device='cpu', providers=None, candidates=4):
    """Median ms per action chunk for ONNX Runtime (as loaded by default, with the batch fixed to
    1 and bound buffers, and on the CUDA provider replayed as one CUDA graph) and for PyTorch
    (eager, and on a CUDA device replayed as one CUDA graph), on the same weights and noise."""
    import statistics
    import tempfile
    import time

    import numpy as np
    import torch
    from rko_ros.policy.config import PolicyConfig
    from rko_ros.policy.export import export_onnx, write_card
    from rko_ros.policy.model import DiffusionPolicy
    from rko_ros.policy.runtime import PolicyRuntime, check_chunk_candidates

    candidates = check_chunk_candidates(candidates)
    torch.manual_seed(0)
    cfg = PolicyConfig.preset(preset)
    policy = DiffusionPolicy(cfg).eval()
    obs, act = cfg.obs, cfg.action
    h, w = obs.image_size_px
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, obs.n_obs_steps, len(obs.camera_names), 3, h, w), dtype=np.uint8)
    state = rng.standard_normal((1, obs.n_obs_steps, obs.state_dim)).astype(np.float32)
    noise = rng.standard_normal((1, act.horizon, act.action_dim)).astype(np.float32)

    def timed(fn):
        fn()  # warm-up (a CUDA graph is captured here)
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    with tempfile.TemporaryDirectory() as tmp:
        card = export_onnx(policy, os.path.join(tmp, 'policy.onnx'), version='bench')
        write_card(os.path.join(tmp, 'card.yaml'), card)
        runtime = PolicyRuntime(tmp, providers=providers)
        reference = runtime.predict(images, state, noise)
        engines = {'ort': runtime.predict}
        notes = {}
        variants = [('ort_batch1', {'batch_size': 1})]
        if runtime.provider == 'CUDAExecutionProvider':
            variants.append(('ort_cuda_graph', {'cuda_graph': True}))
        for name, kwargs in variants:
            try:
                engines[name] = PolicyRuntime(tmp, providers=providers, **kwargs).predict
            except Exception as exc:  # report why a variant could not run, keep the others
                notes[name] = str(exc).splitlines()[0][:300]

        torch_policy = policy.to(device)
        t_images, t_state, t_noise = (torch.as_tensor(x, device=device) for x in (images, state, noise))

        def run_torch(*_):  # the tensors above hold the same inputs
            with torch.inference_mode():
                out = torch_policy.sample(t_images, t_state, t_noise)
            return out.cpu().numpy()
        engines['torch'] = run_torch
        if str(device).startswith('cuda'):
            try:
                engines['torch_cuda_graph'] = _torch_graphed_sample(torch_policy, t_images,
                                                                    t_state, t_noise)
            except Exception as exc:
                notes['torch_cuda_graph'] = str(exc).splitlines()[0][:300]

        result = {'bench': 'inference', 'preset': preset}
        diffs = {}
        for name, fn in engines.items():
            try:
                ms = timed(lambda: fn(images, state, noise))
                out = fn(images, state, noise)
            except Exception as exc:
                notes[name] = str(exc).splitlines()[0][:300]
                continue
            result[f'{name}_ms'] = round(ms, 3)
            diffs[name] = float(np.abs(np.asarray(out) - reference).max())
        result.update({
            'speedup': round(result['torch_ms'] / result['ort_ms'], 3),
            'fastest': min((k[:-3] for k in result if k.endswith('_ms')),
                           key=lambda k: result[f'{k}_ms']),
            'max_abs_diff': max(diffs.values()), 'max_abs_diff_by_engine': diffs,
            'provider': runtime.provider, 'torch_device': str(device),
            'params': policy.num_parameters(), 'ddim_steps': cfg.diffusion.num_inference_steps,
            'horizon': act.horizon, 'repeats': repeats, 'torch_threads': torch.get_num_threads()})
        if candidates > 1:   # the policy node's chunk_candidates: one batched call, then the pick
            previous = reference[0, act.n_action_steps:]
            result['coherent'] = {'candidates': candidates, 'ort_ms': round(timed(
                lambda: runtime.predict_coherent(images[0], state[0], previous, candidates)), 3)}
            result['coherent']['vs_one_draw'] = round(result['coherent']['ort_ms'] /
                                                      result['ort_ms'], 3)
        if notes:
            result['not_run'] = notes
        return result


def _torch_graphed_sample(policy, images, state, noise):
    """policy.sample captured once in a CUDA graph; the returned function replays it on the
    inputs given here (it takes and ignores predict's arguments)."""
    import torch
    static = [images.clone(), state.clone(), noise.clone()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):  # warm-up on a side stream, as CUDA graph capture requires
            policy.sample(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = policy.sample(*static)

    def replay(*_):
        graph.replay()
        return out.cpu().numpy()
    replay.static_inputs = static  # the graph reads its inputs from these addresses: keep them
    return replay


def bench_train(preset='cloth', steps=200, device='cpu'):
    import itertools
    import statistics
    import time

    import torch
    from rko_ros.policy.config import PolicyConfig
    from rko_ros.policy.model import DiffusionPolicy
    from rko_ros.policy.synthetic import make_two_mode_windows
    from rko_ros.policy.train import bf16_native, check_device, train_bc

    device = check_device(device)
    if steps < 30:
        raise RkoError(f'--steps {steps}: at least 30 (the first 20 are not timed)')
    if preset == 'cloth':
        from rko_ros.demo.pipeline import DemoConfig
        cfg = DemoConfig().policy_config()
    else:
        cfg = PolicyConfig.preset(preset)
    cfg.train.steps = steps
    windows, _ = make_two_mode_windows(cfg, n=512, seed=0)
    result = {'bench': 'train', 'preset': preset, 'device': device, 'steps': steps,
              'batch_size': cfg.train.batch_size,
              'image_size_px': list(cfg.obs.image_size_px)}
    graph_modes = [False] + ([True] if torch.device(device).type == 'cuda' else [])
    precisions = ['fp32'] + (['bf16'] if bf16_native(device) else [])
    for graphed, precision in itertools.product(graph_modes, precisions):
        name = ('cuda_graph' if graphed else 'eager') + ('_bf16' if precision == 'bf16' else '')
        stamps = []
        torch.manual_seed(0)
        cfg.train.precision = precision
        policy = DiffusionPolicy(cfg)
        _, metrics = train_bc(policy, windows, progress=False, device=device, cuda_graph=graphed,
                              on_step=lambda step, loss: stamps.append(time.perf_counter()))
        per_step = [(b - a) * 1e3 for a, b in zip(stamps[20:], stamps[21:])]
        result[f'{name}_ms_per_step'] = round(statistics.median(per_step), 3)
        result[f'{name}_first_loss'] = round(metrics['first_loss'], 4)
        result[f'{name}_final_loss'] = round(metrics['final_loss'], 4)
        result['params'] = policy.num_parameters()
    if 'cuda_graph_ms_per_step' in result:
        result['speedup'] = round(result['eager_ms_per_step'] / result['cuda_graph_ms_per_step'], 2)
    if 'eager_bf16_ms_per_step' in result:
        result['bf16_speedup'] = round(result['eager_ms_per_step']
                                       / result['eager_bf16_ms_per_step'], 2)
    return result


def print_result(result, as_json):
    """A bench result: one JSON line, or one aligned `key: value` line per entry."""
    if as_json:
        print(json.dumps(result))
        return 0
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f'{key:>{width}}: {value}')
    return 0


def _bench_train(args):
    return print_result(bench_train(args.preset, args.steps, args.device), args.json)


def _bench_inference(args):
    providers = [p.strip() for p in args.providers.split(',') if p.strip()] if args.providers else None
    return print_result(bench_inference(args.preset, args.repeats, args.device, providers,
                                        args.candidates), args.json)
