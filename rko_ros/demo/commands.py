"""`rko demo` (what `make demo` runs) and `rko bench alignment` (the paper's comparison in sim)."""
import contextlib
import json
import os
import sys
import time
from types import SimpleNamespace

from rko_ros.alignment.methods import METHODS
from rko_ros.errors import GuardRejected, RkoError
from rko_ros.policy.config import PRECISIONS


def register(subparsers):
    p = subparsers.add_parser(
        'demo', help='the whole loop on the simulated cloth: demos -> pretrain -> label -> RKO -> hot swap',
        description='Runs the main job on the embedded simulated cloth-folding task: records scripted '
                    'demonstrations of several fold styles into rosbag2 episodes, pretrains the small '
                    'diffusion policy, brings up the real ROS 2 nodes (`rko up --sim`), runs episodes '
                    'through the policy node while the simulated operator labels them through the '
                    'feedback services, starts fine-tuning (RKO by default) through trainer/start, '
                    'waits for the hot swap and evaluates again. Prints a before/after table and '
                    'writes a report folder (plot, frames, JSON). 16 minutes on a 2-core AMD EPYC, '
                    'about half an hour on a slower 2-core CPU, most of it pretraining and '
                    'fine-tuning (`--device cuda` trains on a GPU); '
                    '`--keep` reuses the demonstrations and pretrained model already in --out.')
    p.add_argument('--out', default='demo_out', help='data + report folder (default demo_out)')
    p.add_argument('--quick', action='store_true', help='tiny sizes for tests (about a minute)')
    p.add_argument('--preferred-style', default='left_to_right',
                   help='the fold style the simulated operator wants (default left_to_right)')
    p.add_argument('--method', default='rko', choices=METHODS)
    p.add_argument('--demos-per-style', type=int, help='scripted demonstrations per style')
    _sim_episode_args(p)
    p.add_argument('--shift-px', type=int,
                   help='pretraining moves each window\'s image by up to this many pixels and the '
                        'gripper positions with it (train.shift_px; default 0 = off)')
    p.add_argument('--event-weight', type=float,
                   help='pretraining draws the windows in which the gripper closes or opens before '
                        'the next plan this many times as often as the others (train.event_weight; '
                        'default 3; 1 = every window alike)')
    p.add_argument('--pretrain-steps', type=int, help='BC steps')
    p.add_argument('--label-episodes', type=int,
                   help='episodes the operator labels, all rounds together (default 20)')
    p.add_argument('--label-rounds', type=int,
                   help='label and fine-tune in this many rounds (default 2): the labelled episodes '
                        'are split evenly, each round runs its episodes on the model the round '
                        'before produced and fine-tunes that model on every label so far; 1 = '
                        'label everything on the pretrained model, then fine-tune once')
    p.add_argument('--round-min-desirable', type=int,
                   help='a round before the last keeps labelling on the same model until this many '
                        'labels so far are desirable, using at most half of each later round\'s '
                        'share (default 2; 0 = fixed even rounds)')
    p.add_argument('--eval-episodes', type=int, help='episodes run after the hot swap')
    p.add_argument('--finetune-steps', type=int,
                   help='fine-tuning steps (default 1200)')
    p.add_argument('--finetune-threads', type=int,
                   help='torch threads of each fine-tuning, the trainer node\'s train_threads '
                        '(default 0 = every core: no episode runs while the demo fine-tunes; '
                        'the node alone keeps one core for the others)')
    _finetune_run_args(p)
    p.add_argument('--lambda-u', type=float,
                   help='weight of the undesirable term of kto/rko (default 0.25; 1 = as published; '
                        'see `rko finetune --help`)')
    p.add_argument('--lambda-sft', type=float,
                   help='BC anchor weight during fine-tuning (default 4.0; 0 = the loss as published)')
    p.add_argument('--lambda-d', type=float,
                   help='weight of the desirable term of kto/rko (default 1.0, as published)')
    _guard_args(p, '0.5')
    p.add_argument('--seed', type=int, default=0)
    _device_arg(p)
    p.add_argument('--keep', action='store_true', help='reuse demonstrations/pretrained model in --out')
    p.add_argument('--json', action='store_true', help='print the summary as one JSON line at the end')
    p.set_defaults(func=_demo)


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        'alignment', help='sft/dpo/rpo/kto/rko/fkpd on the simulated cloth, same labels, several seeds',
        description='The paper\'s comparison in simulation: one pretrained policy, the same labelled '
                    'rollouts for every method, several seeds, preferred-style success and fold '
                    'quality after fine-tuning, and a sweep over the number of labelled episodes. '
                    'Evaluation rollouts are batched through ONNX Runtime offline (no ROS) so the '
                    'sweep fits on a CPU. Prints a table and one JSON line; writes a PNG.')
    p.add_argument('--out', default='bench_alignment_out',
                   help='data + plot folder; a pretrained model already there is reused (default %(default)s)')
    p.add_argument('--methods', nargs='+', default=['sft', 'dpo', 'rpo', 'kto', 'rko', 'fkpd'],
                   choices=METHODS,
                   help='methods to fine-tune and compare (default: all six, sft dpo rpo kto rko fkpd); fkpd '
                        'also reads the demonstrations it was pretrained on')
    p.add_argument('--labels', nargs='+', type=int,
                   help='numbers of labelled episodes to sweep (default 10 20; --quick 2 4)')
    p.add_argument('--seeds', type=int, help='fine-tuning seeds per setting (default 2; --quick 1)')
    p.add_argument('--first-seed', type=int, default=0,
                   help='first fine-tuning seed (default 0): another process or machine can run '
                        'seeds 2.. of the same sweep (--first-seed 2) for --merge')
    p.add_argument('--eval-episodes', type=int,
                   help='evaluation rollouts per fine-tuned version (default 30; --quick 2)')
    p.add_argument('--finetune-steps', type=int,
                   help='fine-tuning steps per run (default 300, so a sweep of the published '
                        'methods fits on a CPU; the demo runs 1200 with --lambda-retrieved 32 '
                        '--finetune-patience 0; --quick 6)')
    p.add_argument('--pretrain-steps', type=int, help='BC steps (default 6000; --quick 20)')
    p.add_argument('--demos-per-style', type=int,
                   help='scripted demonstrations per style (default 20; --quick 2)')
    _sim_episode_args(p)
    p.add_argument('--preferred-style', default='left_to_right',
                   help='the simulated operator\'s style (default %(default)s)')
    p.add_argument('--lambda-u', type=float, default=1.0,
                   help='weight of the undesirable term of kto/rko (default 1.0, as published)')
    p.add_argument('--lambda-sft', type=float, default=0.0,
                   help='BC anchor weight for every method (default 0: the losses as published)')
    p.add_argument('--lambda-d', type=float, default=1.0,
                   help='weight of the desirable term of kto/rko (default 1.0, as published)')
    _guard_args(p, 'off, the methods as published')
    _finetune_run_args(p)
    # The bench's defaults: the methods as published.
    p.set_defaults(lambda_retrieved=0.0, preference_min_timestep=0, finetune_select='margin',
                   finetune_lr=1e-4, retrieved_undesirable_share=0.0,
                   finetune_ema_decay=0.0)
    p.add_argument('--quick', action='store_true',
                   help='tiny sizes for tests (the demo\'s --quick sizes, 2 and 4 labels, 1 seed, '
                        '2 evaluation rollouts); flags given still win')
    _device_arg(p)
    p.add_argument('--json', action='store_true', help='print the result as one JSON line')
    p.add_argument('--merge', nargs='+', metavar='FILE',
                   help='train nothing: combine the JSON lines of earlier runs (files holding '
                        'their --json output) into one table, e.g. methods or label counts split '
                        'over processes or machines (each on its own copy of --out, so the '
                        'pretrained model is shared). They must share that model and every '
                        'setting; the plot goes to --out')
    p.set_defaults(func=_bench_alignment)


# The bench's own defaults where a flag is not given; pretraining sizes not listed come from
# DemoConfig (or DemoConfig.quick).
_BENCH_DEFAULTS = {'labels': [10, 20], 'seeds': 2, 'eval_episodes': 30, 'finetune_steps': 300}
_BENCH_QUICK = {'labels': [2, 4], 'seeds': 1, 'eval_episodes': 2}


def _device_arg(p):
    p.add_argument('--device', default='cpu',
                   help="torch device of pretraining and fine-tuning, e.g. 'cuda' (default cpu). "
                        'On a GPU, --pretrain-steps 12000 trains the base policy that completes '
                        'about 90%% of its folds (README)')
    p.add_argument('--precision', choices=PRECISIONS,
                   help='arithmetic of pretraining: fp32, bf16 autocast (weights stay float32), '
                        'or auto = on a CPU with native bfloat16 (AVX512-BF16 or AMX) the faster '
                        'of the two, timed on a few steps at the start, fp32 elsewhere (`rko '
                        'demo` default: auto; `rko train`: the config, fp32 unless set). `rko '
                        'bench train` shows both')


def _sim_episode_args(p):
    """How the simulated episodes are made: the demonstrator's noise and retries, the policy's."""
    p.add_argument('--demo-noise', type=float,
                   help='scale of the scripted demonstrator\'s teleoperator noise (grasp and '
                        'release points, speeds, pauses, wobble); default 0.5: a careful operator, '
                        'as the policy grasps about as precisely as its demonstrations')
    p.add_argument('--noise-scale', type=float,
                   help='scale of the policy\'s diffusion noise in every episode, labelled or '
                        'evaluated (policy_node noise_scale; default 1 = as Diffusion Policy '
                        'samples, 0 = deterministic chunks). Below 1 this task\'s policies drift '
                        'to left_to_right whatever the labels (README)')
    p.add_argument('--chunk-candidates', type=int,
                   help='draws per action chunk in every episode, labelled or evaluated '
                        '(policy_node chunk_candidates): above 1 each chunk is the one of this '
                        'many closest to the plan in hand, so a motion is not switched halfway '
                        '(default: DemoConfig, see README; 1 = one draw, as trained)')
    p.add_argument('--wrist-view-m', type=float,
                   help='add a wrist camera: a second image (the same size) looking down around '
                        'the gripper, spanning this many metres of table (sim_node wrist_view_m, '
                        'the policy\'s second camera; default: DemoConfig, see README; 0 = the '
                        'scene camera only)')
    p.add_argument('--demo-attempts', type=int,
                   help='tries per cloth and style: a failed demonstration is redone on the same '
                        'cloth with new noise and only folds that worked are kept (default 3; 1 = '
                        'keep every demonstration as it came)')


def _finetune_run_args(p):
    p.add_argument('--finetune-lr', type=float,
                   help='AdamW learning rate of each fine-tuning (demo default: DemoConfig, '
                        'see README; bench default 1e-4, `rko finetune`\'s)')
    p.add_argument('--finetune-patience', type=int,
                   help='held-out evaluations without gain before a fine-tuning run stops '
                        '(default 0 = run every step and keep the best evaluated one; '
                        '`rko finetune` stops after 6)')
    p.add_argument('--finetune-select', choices=('margin', 'last'),
                   help='checkpoint each fine-tuning keeps: the best held-out margin or the last '
                        'evaluated one, always within the execution guard (demo default last, '
                        'bench default margin: the methods as published)')
    p.add_argument('--finetune-ema', type=float, dest='finetune_ema_decay',
                   help='EMA decay of the fine-tuned weights, what is evaluated and kept (demo '
                        'default 0.995, bench default 0 = the raw weights)')
    p.add_argument('--freeze-encoder', action='store_true',
                   help='fine-tune the action network only, keeping the pretrained image encoders '
                        '(default: the whole network, as published; see `rko finetune --help`)')
    p.add_argument('--lambda-retrieved', type=float,
                   help='BC anchor on the scripted demonstrations that resemble the desirable '
                        'episodes more than the undesirable ones (see `rko finetune --help`; '
                        'demo default 32, bench default 0: the methods as published)')
    p.add_argument('--retrieved-undesirable-share', type=float,
                   help='kto/rko with --lambda-retrieved: share of each batch\'s undesirable '
                        'windows taken from the demonstrations like the undesirable episodes (see '
                        '`rko finetune --help`; demo default 0.5, bench default 0)')
    p.add_argument('--preference-min-timestep', type=int,
                   help='score the methods\' own terms at diffusion timesteps >= this only (see '
                        '`rko finetune --help`; default 0: every timestep, as published)')


def _guard_args(p, default):
    p.add_argument('--guard-tolerance', type=float,
                   help='execution guard of model selection: keep a fine-tuned checkpoint only if '
                        'its denoising error on the held-out desirable windows is at most (1 + '
                        'this) x the pretrained model\'s (see `rko finetune --help`; default: '
                        f'{default})')
    p.add_argument('--no-guard', action='store_true',
                   help='select checkpoints by the held-out margin alone')


def _config(args):
    from rko_ros.demo.pipeline import DemoConfig
    overrides = {k: v for k, v in {
        'data_dir': os.path.abspath(args.out), 'preferred_style': args.preferred_style,
        'method': getattr(args, 'method', 'rko'), 'seed': getattr(args, 'seed', 0),
        'demos_per_style': args.demos_per_style, 'pretrain_steps': args.pretrain_steps,
        'demo_noise': args.demo_noise, 'demo_attempts': args.demo_attempts,
        'wrist_view_m': args.wrist_view_m,
        'pretrain_precision': getattr(args, 'precision', None),
        'noise_scale': args.noise_scale,
        'chunk_candidates': args.chunk_candidates,
        'shift_px': getattr(args, 'shift_px', None),
        'event_weight': getattr(args, 'event_weight', None),
        'label_episodes': getattr(args, 'label_episodes', None),
        'label_rounds': getattr(args, 'label_rounds', None),
        'round_min_desirable': getattr(args, 'round_min_desirable', None),
        'eval_episodes': getattr(args, 'eval_episodes', None),
        'finetune_steps': args.finetune_steps,
        'finetune_threads': getattr(args, 'finetune_threads', None),
        'lambda_sft': getattr(args, 'lambda_sft', None),
        'lambda_u': getattr(args, 'lambda_u', None),
        'lambda_d': getattr(args, 'lambda_d', None),
        'guard_tolerance': args.guard_tolerance,
        'finetune_patience': args.finetune_patience, 'freeze_encoder': args.freeze_encoder,
        'finetune_lr': args.finetune_lr,
        'finetune_select': args.finetune_select, 'finetune_ema_decay': args.finetune_ema_decay,
        'lambda_retrieved': args.lambda_retrieved,
        'retrieved_undesirable_share': args.retrieved_undesirable_share,
        'preference_min_timestep': args.preference_min_timestep,
        'device': getattr(args, 'device', None)}.items() if v is not None}
    if 'device' in overrides:
        from rko_ros.policy.train import check_device
        overrides['device'] = check_device(overrides['device'])
    if args.no_guard:
        overrides['guard_tolerance'] = None
    from rko_ros.sim.styles import STYLES
    if args.preferred_style not in STYLES:
        raise RkoError(f"--preferred-style '{args.preferred_style}' is not a style; choose one of "
                       f'{sorted(STYLES)}')
    return DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)


def _stage(name):
    print(f'\n== {name}', file=sys.stderr, flush=True)


class Stopwatch:
    """Seconds spent per stage name, summed over every `with stopwatch(name):` block."""

    def __init__(self, initial=None):
        self.seconds = dict(initial or {})

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rounded(self):
        return {name: round(value, 1) for name, value in self.seconds.items()}


def _pretrained(cfg, progress=True):
    """Demonstrations + pretraining, reused from cfg.data_dir when already there (--keep).
    Returns (version, metrics, {stage: seconds}); the stages are empty when reused."""
    from tqdm import tqdm
    from rko_ros.demo import pipeline
    from rko_ros.policy.store import ModelStore
    store = ModelStore(cfg.data_dir)
    pretrained = [v for v in store.versions() if store.read_card(v).get('method') == 'pretrain']
    if pretrained:
        return pretrained[-1], store.read_card(pretrained[-1]).get('metrics', {}), {}
    from rko_ros.policy.train import resolve_precision
    precision = resolve_precision(cfg.pretrain_precision, cfg.device)   # refused before any work
    _stage(f'1/5 scripted demonstrations ({len(cfg.styles)} styles x {cfg.demos_per_style})')
    start = time.perf_counter()
    with tqdm(total=len(cfg.styles) * cfg.demos_per_style, desc='demonstrations', unit='episode',
              disable=not progress) as bar:
        ids, episodes = pipeline.record_demonstrations(cfg, progress=bar)
    demo_success = sum(e['result'].success for e in episodes) / len(episodes)
    redone = sum(e.get('attempt', 0) > 0 for e in episodes)
    left_out = len(cfg.styles) * cfg.demos_per_style - len(episodes)
    if redone or left_out:
        print(f'  {redone} failed demonstrations redone on their cloth, {left_out} left out '
              f'(--demo-attempts {cfg.demo_attempts})', file=sys.stderr, flush=True)
    if cfg.pretrain_precision == 'auto' and precision == 'bf16':
        precision = 'fp32 or bf16, the faster here'
    _stage(f'2/5 pretraining the small diffusion policy ({cfg.pretrain_steps} steps, {precision})')
    pretrain_start = time.perf_counter()
    version, metrics = pipeline.pretrain(cfg, ids, progress=progress)
    metrics.update(demonstration_success=demo_success, demonstrations_redone=redone,
                   demonstrations_left_out=left_out)
    return version, metrics, {'demonstrations': pretrain_start - start,
                              'pretraining': time.perf_counter() - pretrain_start}


def _demo(args):
    from tqdm import tqdm
    from rko_ros.alignment.trainer import labels_problem
    from rko_ros.demo import pipeline, report
    from rko_ros.demo.loop import RosLoop, write_demo_params
    from rko_ros.demo.offline import summarize_dicts
    from rko_ros.policy.store import ModelStore
    from rko_ros.ros.commands import default_config_path
    from rko_ros.sim.operator import SimulatedOperator

    cfg = _config(args)
    if os.path.isdir(cfg.data_dir) and os.listdir(cfg.data_dir) and not args.keep:
        raise RkoError(f'{cfg.data_dir} is not empty; remove it, pick another --out, or pass --keep '
                       f'to reuse its demonstrations and pretrained model')
    pipeline.ensure_dir(cfg.data_dir)
    t0 = time.perf_counter()
    pretrained, pretrain_metrics, stage_s = _pretrained(cfg)
    stage_s = Stopwatch(stage_s)
    operator = SimulatedOperator(cfg.preferred_style)
    params = write_demo_params(os.path.join(cfg.data_dir, 'demo_params.yaml'), cfg, default_config_path())
    _stage('3/5 bring-up (`rko up --sim`)')
    with stage_s('bring_up'):
        loop = RosLoop(cfg.data_dir, params)
    try:
        with stage_s('bring_up'):
            loop.wait_ready()
        labelled, rounds, skipped = [], [], ''
        new_version = pretrained
        n_rounds = cfg.label_rounds
        for r in range(1, n_rounds + 1):
            of = f' (round {r} of {n_rounds})' if n_rounds > 1 else ''
            planned, cap = pipeline.round_plan(cfg.label_episodes - len(labelled), n_rounds - r + 1)
            _stage(f'3/5 episodes of {new_version} through the policy node, operator labels{of}')
            episodes = []
            bar = tqdm(total=planned, desc=f'episodes (labelled){of}', unit='episode')
            while True:
                good = sum(bool(e['label']) for e in labelled + episodes)
                if pipeline.round_done(len(episodes), planned, cap, good,
                                       len(labelled) + len(episodes) - good, cfg.method,
                                       cfg.round_min_desirable):
                    break
                if len(episodes) == bar.total:  # waiting for a desirable label: one more
                    bar.total += 1
                    bar.refresh()
                with stage_s('labelled_episodes'):
                    episode_id, result, label = loop.run_episode(
                        label_fn=lambda res: operator.label(SimpleNamespace(**res)))
                episodes.append({'episode': episode_id, 'label': label, 'round': r,
                                 'model_version': new_version, **result})
                bar.update(1)
            bar.close()
            if len(episodes) > planned:
                print(f'round {r} labelled {len(episodes)} episodes (planned {planned}): it '
                      f'waited for {cfg.round_min_desirable} desirable labels', file=sys.stderr)
            labelled += episodes
            round_info = {'round': r, 'model_version': new_version, 'episodes': len(episodes),
                          'desirable': sum(bool(e['label']) for e in episodes),
                          'summary': summarize_dicts(episodes, cfg.preferred_style)}
            desirable = sum(bool(e['label']) for e in labelled)
            problem = labels_problem(cfg.method, desirable, len(labelled) - desirable)
            if problem:
                # Nothing to align to (or nothing to move away from): a person would record more.
                skipped = (f'the operator labelled {desirable} of {len(labelled)} episodes '
                           f'desirable; {problem}')
                print(f'fine-tuning skipped{of}: {skipped}', file=sys.stderr)
            else:
                _stage(f'4/5 fine-tuning ({cfg.method}) on {len(labelled)} labelled episodes '
                       f'through trainer/start, hot swap{of}')
                bar = tqdm(total=cfg.finetune_steps, desc=f'fine-tuning ({cfg.method})', unit='step')

                def progress(status):
                    step = int(float(status.get('step', 0) or 0))
                    bar.update(max(0, step - bar.n))
                try:
                    with stage_s('fine_tuning'):
                        new_version, skipped = loop.finetune_and_reload(on_progress=progress), ''
                except GuardRejected as exc:
                    # The guard refused every checkpoint: the robot keeps the model it runs.
                    skipped = str(exc)
                    print(f'\nfine-tuning rejected, {new_version} stays: {skipped}', file=sys.stderr)
                bar.close()
            round_info.update(new_version=new_version, finetune_skipped=skipped)
            rounds.append(round_info)
        before = [e for e in labelled if e['round'] == 1]
        _stage(f'5/5 evaluation of {new_version} through the policy node')
        after = []
        for _ in tqdm(range(cfg.eval_episodes), desc='episodes (after)', unit='episode'):
            with stage_s('evaluation'):
                episode_id, result, _ = loop.run_episode()
            after.append({'episode': episode_id, **result})
        # The operator's undo button for models: back to the parent, then forward again.
        rollback_ok = reload_ok = None
        if new_version != pretrained:
            parent = ModelStore(cfg.data_dir).previous_version(new_version)
            rollback_ok, _ = loop.call('policy/rollback')
            loop.spin_for(1.0)
            rolled_back_to = loop.policy_status.get('model_version')
            reload_ok, _ = loop.call('policy/reload')
            rollback_ok = bool(rollback_ok) and rolled_back_to == parent
        # What the policy node says it samples with (its noise_scale parameter, from the demo's).
        node_noise_scale = loop.policy_status.get('noise_scale')
        node_candidates = loop.policy_status.get('chunk_candidates')
    finally:
        loop.close()
    summary = {
        'preferred_style': cfg.preferred_style, 'method': cfg.method,
        'pretrained_version': pretrained, 'aligned_version': new_version,
        'noise_scale': None if node_noise_scale is None else float(node_noise_scale),
        'chunk_candidates': None if node_candidates is None else int(node_candidates),
        'labelled_episodes': len(labelled),
        'desirable_labels': sum(bool(e['label']) for e in labelled), 'rounds': rounds,
        'before': summarize_dicts(before, cfg.preferred_style),
        'after': summarize_dicts(after, cfg.preferred_style),
        'rollback_ok': rollback_ok, 'reload_ok': reload_ok,
        # Why the robot still runs the pretrained model ('' when a fine-tuned one runs; a later
        # round's refusal is in its `rounds` entry).
        'finetune_skipped': skipped if new_version == pretrained else '',
        'pretrain': pretrain_metrics,
        # Where the time went, by stage (seconds; reused demonstrations and model: none).
        'stage_s': stage_s.rounded(),
        'wall_s': round(time.perf_counter() - t0, 1)}
    summary['target_met'] = (summary['after']['preferred_success'] >= 0.9
                             and summary['labelled_episodes'] <= 20)
    report_dir = report.write_demo_report(cfg, summary, labelled, after)
    summary['report_dir'] = report_dir
    print(report.demo_table(summary))
    if args.json:
        print(json.dumps(pipeline.as_jsonable(summary)))
    return 0


def _bench_alignment(args):
    from rko_ros.demo.bench import run_alignment_bench
    if args.merge:
        return _merge_bench(args)
    if args.guard_tolerance is None:
        args.no_guard = True   # the comparison is of the methods as published unless asked
    for key, value in (_BENCH_QUICK if args.quick else _BENCH_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ('seeds', 'eval_episodes'):
        if getattr(args, key) < 1:
            raise RkoError(f'--{key.replace("_", "-")} {getattr(args, key)} must be >= 1')
    if args.first_seed < 0:
        raise RkoError(f'--first-seed {args.first_seed} must be >= 0')
    if min(args.labels) < 1:
        raise RkoError(f'--labels {args.labels}: every count must be >= 1')
    cfg = _config(args)
    result = run_alignment_bench(cfg, args.methods, args.labels, args.seeds, args.eval_episodes,
                                 first_seed=args.first_seed)
    return _print_bench(result, args.json)


def _print_bench(result, as_json):
    """The bench's table, and its JSON line with --json (a run or a merge)."""
    from rko_ros.demo.pipeline import as_jsonable
    from rko_ros.demo.report import bench_table
    print(bench_table(result))
    if as_json:
        print(json.dumps(as_jsonable(result)))
    return 0


def read_bench_line(path):
    """The last JSON line of a file holding `rko bench alignment --json` output."""
    try:
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
    except OSError as exc:
        raise RkoError(f'cannot read {path}: {exc.strerror}') from None
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict) or result.get('bench') != 'alignment' or 'runs' not in result:
        raise RkoError(f'{path} does not end with the JSON line of `rko bench alignment --json`')
    return result


def _merge_bench(args):
    from rko_ros.demo.bench import merge_results
    from rko_ros.demo.pipeline import ensure_dir
    results = [read_bench_line(path) for path in args.merge]
    ensure_dir(args.out)
    return _print_bench(merge_results(results, os.path.join(args.out, 'alignment_bench.png')),
                        args.json)
