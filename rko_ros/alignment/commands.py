"""`rko finetune`, `rko bench finetune-cost` (and `rko bench theory` when bandit.py is present)."""
import json
import os

from rko_ros.alignment.methods import METHODS
from rko_ros.errors import RkoError


def register(subparsers):
    p = subparsers.add_parser(
        'finetune', help='align the policy to the operator\'s labels (RKO by default)',
        description='Fine-tune a model version on the labelled episodes and preferences in the '
                    'catalog, reading the windows from the bags. Methods: rko (KTO-style utility '
                    'weighted by observation similarity), kto, rpo, dpo, fkpd, sft. The paper\'s '
                    'beta is the default per method (dpo 10, rpo 20, kto/rko 12); tau 0.15. '
                    'Writes a new version atomically (checkpoint, ONNX, card, metrics.csv, '
                    'training.png) and prints its name; the active model changes only with '
                    '--activate or when the policy node reloads. Several GPUs: '
                    'torchrun --nproc_per_node=N -m rko_ros.cli finetune ... --device cuda')
    p.add_argument('--data-dir', default=os.environ.get('RKO_DATA_DIR', 'data'),
                   help='data directory (default: $RKO_DATA_DIR or ./data)')
    p.add_argument('--method', default='rko', choices=METHODS, help='alignment method (default rko)')
    p.add_argument('--from', dest='from_version', help='parent version (default: the active one)')
    p.add_argument('--steps', type=int, default=300, help='optimizer steps (default 300)')
    p.add_argument('--batch-size', type=int, default=32, help='windows per batch (default 32)')
    p.add_argument('--lr', type=float, default=1e-4, help='AdamW learning rate (default 1e-4)')
    p.add_argument('--beta', type=float, help='implied-reward scale (default: per method)')
    p.add_argument('--tau', type=float, default=0.15, help='similarity temperature (rpo, rko)')
    p.add_argument('--no-center-embeddings', action='store_true',
                   help='rpo/rko: cosine of the raw reference embeddings; by default they are '
                        'centred on the labelled windows\' mean first, so the weights can tell '
                        'situations apart')
    p.add_argument('--utility', default='sigmoid', choices=['sigmoid', 'log_sigmoid'],
                   help='kto/rko value function (default sigmoid)')
    p.add_argument('--reduction', default='sum', choices=['sum', 'mean'],
                   help='denoising error over the chunk: sum (default) or mean')
    p.add_argument('--lambda-sft', type=float, default=0.0,
                   help='BC anchor: + this x the denoising error of the desirable windows (pair '
                        'winners), which keeps execution from drifting while the preference term '
                        'moves the mode; 0 (default) = the method as published')
    p.add_argument('--lambda-behaviour', type=float, default=0.0,
                   help='any method: + this x the denoising error of the pretraining '
                        'demonstrations (the root version\'s episodes); 0 (default) = off')
    p.add_argument('--lambda-retrieved', type=float, default=0.0,
                   help='retrieval anchor: + this x the denoising error of the pretraining '
                        'demonstrations that resemble the desirable episodes more than the '
                        'undesirable ones and about as much as the desirable ones resemble each '
                        'other (observation embedding + action chunk, nearest labelled windows); '
                        'the version card lists the retrieved episodes; 0 (default) = off')
    p.add_argument('--retrieval-tau', type=float, default=0.05,
                   help='softmax temperature of that retrieval (default 0.05)')
    p.add_argument('--retrieval-threshold', type=float, default=0.5,
                   help='retrieve a demonstration only if its mean score (share of desirable '
                        'similarity, 0..1) is above this (default 0.5)')
    p.add_argument('--retrieval-reach', type=float, default=2.0,
                   help='... and only if its distance to the desirable episodes is at most this x '
                        'the largest distance of one desirable episode to the others (default 2; '
                        '0 = no such test: a style no label shows can then be retrieved)')
    p.add_argument('--retrieved-undesirable-share', type=float, default=0.0,
                   help='kto/rko with --lambda-retrieved: this share of each batch\'s undesirable '
                        'windows comes from the demonstrations that resemble the undesirable '
                        'episodes (the same retrieval, other side): the push away from the '
                        'unwanted behaviour then covers more situations than the few bad '
                        'episodes show; 0 (default) = the labelled windows only')
    p.add_argument('--preference-min-timestep', type=int, default=0,
                   help='score the method\'s own terms at diffusion timesteps >= this only (the '
                        'high-noise steps that choose which behaviour is drawn; the BC anchors '
                        'still cover every step), meant to keep the push away from the bad '
                        'episodes from bending the fine placement of the good ones (on the cloth '
                        'no gain so far, see README); 0 (default) = every timestep, as published')
    p.add_argument('--shift-px', type=int, default=None,
                   help='move each training window\'s images by up to this many pixels (and the '
                        'positions the parent\'s train.shift_joints tie to them); default: what '
                        'the parent was pretrained with (its train.shift_px); 0 = off. Held-out '
                        'scoring always sees the recorded images')
    p.add_argument('--event-weight', type=float, default=1.0,
                   help='the retrieval anchor draws the windows of the retrieved demonstrations '
                        'in which the gripper closes or opens before the next plan this many '
                        'times as often as the others (the parent\'s train.event_action marks '
                        'them; the cloth demo pretrains with 3); default 1 = every window alike '
                        '(on the cloth no gain so far, see docs/experiments.md)')
    p.add_argument('--ema-decay', type=float, default=0.0,
                   help='keep an EMA of the weights and select/export it (e.g. 0.99); 0 '
                        '(default) = the raw weights')
    p.add_argument('--guard-tolerance', type=float, default=0.5,
                   help='execution guard: a checkpoint is kept only if its denoising error on the '
                        'guard windows is at most (1 + this) x the parent\'s; if none is, nothing '
                        'is written (default 0.5)')
    p.add_argument('--guard-windows', default='desirable', choices=['desirable', 'behaviour'],
                   help='the guard\'s windows: the held-out desirable ones (default) or the '
                        'pretraining demonstrations (which include the styles the labels move '
                        'away from: use a wider tolerance)')
    p.add_argument('--no-guard', action='store_true',
                   help='select by the held-out margin alone (the methods as published)')
    p.add_argument('--lambda-d', type=float, default=1.0,
                   help='kto/rko: weight of the desirable term (default 1)')
    p.add_argument('--lambda-u', type=float, default=1.0,
                   help='kto/rko: weight of the undesirable term (default 1). Batches are already '
                        'half desirable, half undesirable; a smaller value softens the push away '
                        'from bad episodes, which with few good ones can wreck execution '
                        '(cloth demo: 0.25 gave 35%% preferred-style success against 12.5%%)')
    p.add_argument('--lambda-fkl', type=float, default=1.0,
                   help='fkpd: weight of the forward-KL (BC) term on the pretraining data')
    p.add_argument('--eval-every', type=int, default=25, help='held-out evaluation period')
    p.add_argument('--patience', type=int, default=6,
                   help='held-out evaluations without gain before stopping (default 6; 0 = run '
                        'every step)')
    p.add_argument('--select', choices=('margin', 'last'), default='margin',
                   help='checkpoint to keep: the best held-out margin (default) or the last '
                        'evaluated one; either way only one within the execution guard')
    p.add_argument('--freeze-encoder', action='store_true',
                   help='train the action network only and keep the parent\'s image encoders '
                        '(default: the whole network). On the cloth demo it did not reliably '
                        'help: see the README')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu', help="torch device, e.g. 'cuda'")
    p.add_argument('--threads', type=int, default=0,
                   help='CPU threads of torch (default 0: one per core). The trainer node '
                        'passes its train_threads (default one per core but one, so the nodes '
                        'beside the training keep a core)')
    p.add_argument('--activate', action='store_true', help='make the new version the active one')
    p.add_argument('--camera-topics', nargs='+',
                   help="bag topics of the cameras (default: the parent card's camera_topics)")
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--json', action='store_true', help='print one JSON line with the result')
    p.set_defaults(func=_finetune)


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        'finetune-cost', help='time of an RKO step vs a plain fine-tuning step',
        description='Times optimizer steps of sft and rko (and the other methods with --all) on the '
                    'same batch size with the small preset. Target: rko_ms / sft_ms <= 1.6.')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--steps', type=int, default=10, help='timed steps per method (default 10)')
    p.add_argument('--all', action='store_true', help='also time kto, dpo, rpo, fkpd')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_bench_cost)
    try:
        from rko_ros.alignment import bandit  # noqa: F401  (optional until the theory check lands)
    except ImportError:
        return
    bandit.register_bench(bench_subparsers)


def behaviour_episodes(store, version):
    """The pretraining episodes at the root of a version's lineage (fkpd's behaviour data)."""
    seen = set()
    while version and version not in seen:
        seen.add(version)
        card = store.read_card(version)
        if not card.get('parent'):
            return list(card.get('episodes') or [])
        version = card['parent']
    return []


def _finetune(args):
    from rko_ros.alignment.trainer import FinetuneConfig, LabelledWindows, finetune
    from rko_ros.episodes.catalog import Catalog
    from rko_ros.episodes.dataset import WindowSpec, load_labelled, load_windows
    from rko_ros.policy.store import ModelStore
    from rko_ros.policy.train import check_device

    args.device = check_device(args.device)   # before reading any bag
    store = ModelStore(args.data_dir)
    parent = args.from_version or store.active_version()
    if parent is None:
        raise RkoError(f'no active model in {args.data_dir}; pretrain with `rko train` or pass --from')
    card = store.read_card(parent)
    policy_config = store.load_policy(parent).config
    topics = {'cameras': args.camera_topics or card.get('camera_topics') or None}
    spec = WindowSpec.from_config(policy_config, topics)
    cfg = FinetuneConfig(method=args.method, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, beta=args.beta, tau=args.tau, utility=args.utility,
                         center_embeddings=not args.no_center_embeddings,
                         reduction=args.reduction, eval_every=args.eval_every,
                         patience=args.patience, select=args.select, seed=args.seed,
                         lambda_sft=args.lambda_sft,
                         lambda_fkl=args.lambda_fkl, lambda_behaviour=args.lambda_behaviour,
                         lambda_retrieved=args.lambda_retrieved, retrieval_tau=args.retrieval_tau,
                         retrieval_threshold=args.retrieval_threshold,
                         retrieval_reach=args.retrieval_reach,
                         retrieved_undesirable_share=args.retrieved_undesirable_share,
                         preference_min_timestep=args.preference_min_timestep,
                         shift_px=args.shift_px, event_weight=args.event_weight,
                         lambda_d=args.lambda_d, lambda_u=args.lambda_u,
                         ema_decay=args.ema_decay, freeze_encoder=args.freeze_encoder,
                         guard_tolerance=None if args.no_guard else args.guard_tolerance,
                         guard_windows=args.guard_windows, num_threads=args.threads)
    labelled = load_labelled(args.data_dir, spec, progress=not args.no_progress)
    data = LabelledWindows.from_dataset(labelled.windows)
    behaviour = None
    if args.method == 'fkpd' or args.lambda_behaviour or args.lambda_retrieved or \
            (cfg.guard_tolerance is not None and cfg.guard_windows == 'behaviour'):
        episodes = behaviour_episodes(store, parent)
        behaviour = load_windows(args.data_dir, episodes, spec, progress=False) if episodes else None
    # Under torchrun every rank runs this; only rank 0 records the run and writes the version.
    lead = int(os.environ.get('RANK', '0')) == 0
    run_id = None
    if lead:
        with Catalog(args.data_dir) as catalog:
            run_id = catalog.start_run(args.method, parent_version=parent,
                                       episodes=list(labelled.windows.episode_ids),
                                       config={k: v for k, v in vars(args).items() if k != 'func'})
    try:
        version, summary = finetune(store, parent, data, cfg, behaviour=behaviour,
                                    pairs=labelled.preferences, device=args.device,
                                    progress=not args.no_progress, activate=args.activate,
                                    card_extra={'camera_topics': list(spec.camera_topics)})
    except BaseException as exc:
        if lead:
            with Catalog(args.data_dir) as catalog:
                catalog.finish_run(run_id, status='failed', error=str(exc))
        raise
    if version is None:  # a non-zero DDP rank
        return 0
    with Catalog(args.data_dir) as catalog:
        catalog.finish_run(run_id, new_version=version, metrics=summary)
    result = {'version': version, 'parent': parent, 'method': args.method, **summary}
    print(json.dumps(result) if args.json else
          f"new version {version} (parent {parent}, {args.method}); best held-out margin "
          f"{summary['best_holdout_margin']:.3f} at step {summary['best_step']}" +
          (f"; retrieved {len(summary['retrieval']['episodes'])} of "
           f"{summary['retrieval']['of_episodes']} demonstrations" if summary.get('retrieval') else ''))
    return 0


def bench_finetune_cost(batch_size=32, steps=10, methods=('sft', 'rko')):
    import statistics
    import time

    import numpy as np
    import torch
    from rko_ros.alignment.trainer import FinetuneConfig, LabelledWindows, PreferenceTrainer
    from rko_ros.policy.config import PolicyConfig
    from rko_ros.policy.model import DiffusionPolicy
    from rko_ros.policy.synthetic import make_two_mode_windows

    torch.manual_seed(0)
    config = PolicyConfig.preset('small')
    windows, modes = make_two_mode_windows(config, n=4 * batch_size)
    data = LabelledWindows(windows, np.where(modes == 1, 1, -1), np.arange(len(modes)) // 4)
    policy = DiffusionPolicy(config)
    policy.fit_normalizer(windows.state.reshape(-1, config.obs.state_dim),
                          windows.action.reshape(-1, config.action.action_dim))
    out = {'bench': 'finetune-cost', 'batch_size': batch_size, 'preset': 'small',
           'torch_threads': torch.get_num_threads()}
    # Steps of the methods are interleaved (sft, rko, sft, rko, ...) so that load from other
    # processes on a shared machine falls on every method alike; medians after 2 warm-up rounds.
    trainers = {m: PreferenceTrainer(policy, data, FinetuneConfig(method=m, batch_size=batch_size),
                                     behaviour=windows, progress=False) for m in methods}
    samples = {m: [] for m in methods}
    for i in range(steps + 2):
        for method, trainer in trainers.items():
            start = time.perf_counter()
            loss, _ = trainer.loss()
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            if i >= 2:
                samples[method].append((time.perf_counter() - start) * 1e3)
    for method in methods:
        out[f'{method}_ms'] = round(statistics.median(samples[method]), 2)
    out['ratio'] = round(out['rko_ms'] / out['sft_ms'], 3)
    out['target_ratio'] = 1.6
    return out


def _bench_cost(args):
    methods = ('sft', 'rko', 'kto', 'dpo', 'rpo', 'fkpd') if args.all else ('sft', 'rko')
    result = bench_finetune_cost(args.batch_size, args.steps, methods)
    print(json.dumps(result) if args.json else '\n'.join(f'{k:>14}: {v}' for k, v in result.items()))
    return 0
