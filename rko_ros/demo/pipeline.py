"""Stages of the cloth demo that touch disk: demonstrations -> bags + catalog -> pretrained version.

Every stage writes real artefacts under one `data_dir` (rosbag2 episodes, catalog.sqlite, model
versions), so what the demo builds is what a robot team would have: `rko episodes list` and
`rko finetune` work on it afterwards.
"""
import dataclasses
import os

import numpy as np

from rko_ros.alignment.methods import check_finetune_options, undesirable_share
from rko_ros.errors import ConfigError
from rko_ros.sim.styles import DEFAULT_STYLES
from rko_ros.sim.task import ACTION_NAMES, JOINT_NAMES, TaskConfig

CAMERA_TOPIC = 'camera/image_raw'


def topics_of_cameras(camera_names):
    """The sim's topic of each camera: NAME/image_raw (CAMERA_TOPIC for the scene camera), as
    WindowSpec names them by default."""
    return [f'{name}/image_raw' for name in camera_names]


@dataclasses.dataclass
class DemoConfig:
    data_dir: str = 'demo_out'
    preferred_style: str = 'left_to_right'
    styles: tuple = DEFAULT_STYLES
    demos_per_style: int = 20
    # Scale of the scripted demonstrator's teleoperator noise. The policy grasps about as
    # precisely as its demonstrations: offline, 80 new cloths x two noise draws (2026-11-28,
    # seed-1 demonstrations, 6000 steps), noise 1.0 -> 0.5 took the base's grasps off the grasp
    # point from 11-15% to 6-7.5% (any-style 83.75% -> 88.1%) and the two-round RKO model's
    # preferred-style success from 73.75 / 73.75% to 87.5 / 83.75% (share 92.5-95%). Twice the
    # demonstrations (40 per style) at noise 1.0: no gain (83.75%).
    demo_noise: float = 0.5
    # Tries per cloth and style; > 1 keeps only the demonstrations that fold well (a failed one is
    # redone on the same cloth with a new noise draw), as a team keeps only the teleoperated
    # demonstrations that worked. At noise 0.5 the scripted operator fails 5-15% of its folds
    # (seed 0: 3 of 20 left_to_right, 2 of 20 right_to_left), and the retrieval anchor trained
    # on the failed preferred-style ones as if they were what the operator wants. 1: keep all.
    demo_attempts: int = 3
    image_size_px: tuple = (48, 48)
    # A wrist camera (TaskConfig.wrist_view_m): metres of table around the gripper in a second
    # image of image_size_px; 0: the scene camera only. 0.15 (3 mm a pixel at 48 px), seed 0,
    # 2026-11-29: the base folded 95 / 91.25% of 80 new cloths offline (any style; grasps off
    # 1.25 / 8.75%) against 86-88% for scene-only bases, but the demo's final model 86.25 / 87.5%
    # (scene-only final models 83.75-91.25%); the demo through ROS 30% -> 60%, with camera
    # frames one or two ticks stale in 11 of its 40 episodes, and on a quiet machine the base 20
    # of 20 folds, the final model 16 of 20. Fine-tuning gives back the base's gain; pretraining
    # 25 min instead of 17, the demo 2704 s. Not the default.
    wrist_view_m: float = 0.0
    # Camera frames (and joint states) of history the policy sees. One frame: offline, 40 new
    # cloths, 3000 BC steps at lr 2e-3, grasp error median 10.5 mm (2 frames 11.9 mm), 6 of 40
    # grasps > 15 mm off (11), 70% any-style folds (70%), and a BC step 27% cheaper.
    n_obs_steps: int = 1
    # Execution is what caps the preferred-style success, and BC steps are what buy it. Offline,
    # 80 new cloths (2026-11-27): 3000 steps complete 65% of folds (left_to_right 20 of 28),
    # 6000 steps 86% (23 of 26), grasps off the grasp point 27.5% -> 11%; RKO with the demo's
    # settings from each base's own 20 labels: preferred-style success 55% -> 69%. 50 scripted
    # demonstrations per style at 3000 steps: 60%; 6000 steps at batch 32 (the cost of 3000 at
    # 64): 75%. So 6000 at 64, about twice the pretraining time of 3000.
    pretrain_steps: int = 6000
    pretrain_lr: float = 2e-3     # 1e-3: grasp error median 13.3 mm (2 frames); 3e-3 worse
    batch_size: int = 64
    label_episodes: int = 20
    # Label in rounds, as an operator would: 10 episodes of the pretrained model, fine-tune, 10 of
    # the fine-tuned one, fine-tune it on all 20. The second round's episodes mostly fold the
    # preferred way, so they add desirable examples and show how the preferred fold fails.
    # Offline (2026-11-27, the 6000-step base, 80 new cloths x two noise draws, fine-tuning seeds
    # 0 and 1): 76.25 / 83.75 / 73.75 / 77.5% preferred-style success (mean 77.8%, share 84-91%)
    # against 71.9% for the 20 labels in one round; round 2 from the pretrained model instead
    # 72.5 / 71.25%. Full `make demo`: 20% -> 80% (share 95%). One more fine-tuning: about 4
    # minutes here.
    label_rounds: int = 2
    # A round that is not the last keeps labelling on the same model until the labels so far hold
    # this many desirable episodes (and the method has both kinds), up to half of every later
    # round's share: round 1 of the seed-1 demo had none in its 10, skipped its fine-tuning and
    # the demo reached 60% with one fine-tuning. 0: rounds are always their even share.
    round_min_desirable: int = 2
    eval_episodes: int = 20
    method: str = 'rko'
    # 1200 steps with the retrieval anchor, all of them run (patience 0): the held-out margin
    # of 4-5 desirable episodes plateaus noisily, and patience 6 stopped the full demo at step
    # 400 (preferred-style success 20% -> 40%). Offline on that run's labels, 40 new cloths:
    # 1200 steps 67.5% / 62.5% (two seeds; share 90%), the old 300 steps without retrieval 20%.
    # From a 12000-step base's labels: 77.5% (the old defaults 40%).
    finetune_steps: int = 1200
    finetune_patience: int = 0    # held-out evaluations without gain before stopping; 0 = never
    # AdamW learning rate of every fine-tuning (FinetuneConfig.lr). Round 1 refitted offline on
    # three demo runs' labels (2026-11-28, 80 new cloths x two noise draws): 1e-3 moved the style
    # further (no right_to_left fold left) but broke execution, grasps off 24-29%, preferred-style
    # success 74 / 62.5% (seed 0) and 69 / 61% (seed 1) against 89 / 84% and 87.5 / 82.5% at 1e-4;
    # seed 2: 1e-4 72.5 / 71%, 3e-4 71 / 79%, 1e-3 81 / 77.5%.
    finetune_lr: float = 1e-4
    # Which checkpoint a fine-tuning keeps, and its weights' EMA (FinetuneConfig.select,
    # .ema_decay). The held-out margin of 4 episodes kept checkpoints from step 125 to 1200 of
    # 1200, and the early ones had not learnt the retrieved demonstrations. Seed 0's demo, its
    # round 2 refitted offline from its round-1 model (failed demonstrations left out), 80 new
    # cloths x two noise draws, preferred-style success: fine-tuning seed 1 best margin 68.75 /
    # 77.5% (kept step 225), with EMA 83.75 / 80% (step 125), EMA of the last 87.5 / 86.25%;
    # seed 0 88.75 / 87.5% (step 1175) and 87.5 / 85% (EMA, last); seed 2 78.75 / 80% (both).
    finetune_select: str = 'last'
    finetune_ema_decay: float = 0.995
    freeze_encoder: bool = False  # fine-tune the action network only (FinetuneConfig)
    # torch threads of each fine-tuning (the trainer node's train_threads). 0: every core. The
    # trainer node keeps a core for the nodes by default, as a robot trains while it runs; the
    # demo runs no episode while it fine-tunes, and the idle nodes take 15% of a core. On the
    # 2-core AMD development CPU (2026-11-29), 200 steps of the demo's round-2 fine-tuning
    # beside an idle `rko up --sim`: 27.2 s with two threads against 34.1 s with one; on the
    # Intel one of the days before, 317 / 324 ms a step against 322 / 276 ms (rounds 1 / 2).
    finetune_threads: int = 0
    # BC anchor on the demonstrations like the desirable episodes. 16 rather than 4: offline, 80
    # new cloths, each base's own 20 labels, rko 75% against 68.75% preferred-style success from
    # the 6000-step base (share 86% / 82.5%), 63.75% against 55% from the 3000-step base. 32
    # rather than 16, the same 6000-step base and labels, two fine-tuning seeds x two noise
    # draws: 76.25 / 68.75 / 70 / 72.5% (mean 71.9%) against 75 / 67.5 / 63.75 / 61.25% (66.9%).
    lambda_retrieved: float = 32.0
    # Half of each batch's undesirable windows from the demonstrations like the undesirable
    # episodes (FinetuneConfig.retrieved_undesirable_share): a few bad episodes show the unwanted
    # fold on a few cloths, its demonstrations on twenty. Round 1 refitted offline (2026-11-28,
    # 80 new cloths x two noise draws, preferred-style success; right_to_left folds of 160):
    # seed 2 (4 desirable, 6 right_to_left labels) 72.5 / 71.25% -> 82.5 / 75% (19 -> 4; other
    # fine-tuning seeds without it 77.5, 78.75%), seed 1 87.5 / 82.5% -> 88.75 / 82.5% (1 -> 0),
    # seed 0 88.75 / 83.75% -> 80 / 83.75% (2 -> 1). Through ROS, seed 2 with its pretrained
    # model reused: 15.4% -> 95% (20 of 20 folds left_to_right; offline 88.75 / 83.75%) against
    # 40% -> 70% without it (offline 85 / 78.75%, right_to_left 10 of 160).
    retrieved_undesirable_share: float = 0.5
    preference_min_timestep: int = 0  # the method's terms at timesteps >= this (FinetuneConfig)
    # Fine-tuning weights. With 4-5 desirable of 20 labels lambda_u 1 (as published) with
    # lambda_sft 1 pushed away from the bad episodes so hard that execution broke (13 of 20 folds
    # 'none'); offline on that run's labels: lambda_u 1 / lambda_sft 1 12.5% preferred-style
    # success, 0.25 / 1 35%, 1 / 4 37.5%, 0.25 / 4 42.5% (kto 37.5%).
    lambda_sft: float = 4.0      # BC anchor on the desirable windows (see FinetuneConfig)
    lambda_u: float = 0.25       # weight of the undesirable (KTO/RKO) term
    lambda_d: float = 1.0        # weight of the desirable (KTO/RKO) term
    guard_tolerance: float = 0.5  # execution guard of model selection (FinetuneConfig); None = off
    device: str = 'cpu'           # torch device of pretraining and fine-tuning ('cuda' on a GPU box)
    # Pretraining moves each window's camera image by up to this many pixels and the gripper's
    # positions with it (PolicyConfig train.shift_joints): the same fold at another placement.
    shift_px: int = 0
    # Pretraining draws the windows in which the gripper closes or opens before the next plan
    # this many times as often as the others (PolicyConfig train.event_weight, event_action
    # gripper_closed). Offline, each seed's demonstrations of 2026-11-29 evening (bf16, 6000
    # steps; 80 new cloths x two draws, any-style success): seed 0 90 / 95% against 83.75 /
    # 86.25% drawing every window alike, seed 1 91.25 / 93.75% against 85 / 90%, seed 2 83.75 /
    # 91.25% against 86.25 / 83.75%. The demos from scratch with it (seeds 0-2): bases 87.5-95%,
    # final models 85-91.25% preferred-style (mean 89.4% against 82.7% the evening before).
    event_weight: float = 3.0
    # Arithmetic of pretraining (PolicyConfig train.precision). 'auto': on a CPU with native
    # bfloat16 (AVX512-BF16 / AMX) the faster of bf16 autocast and fp32, timed on a few steps
    # first; fp32 elsewhere. Native is not always faster: on the 2-core Intel AMX development
    # CPU bf16 did not pay (2026-11-28 evening: `rko bench train` 160-166 ms per step against
    # 137-162 in fp32, 6000 demo steps 922 s against 951 s), on the 2-core AMD EPYC with
    # AVX512-BF16 (2026-11-29) the demo's BC step took 64.6 ms against 74.7 ms (interleaved),
    # and the demo's pretraining 460-476 s against 556 s. bf16 bases fold about as well (offline
    # any-style, 80 new cloths x two draws: seeds 0 / 1 86.25 / 87.5% and 91.25 / 90% on
    # 2026-11-28, 83.75 / 86.25% and 85 / 90% on 2026-11-29; fp32 bases 85-91%).
    pretrain_precision: str = 'auto'
    # The policy node's noise_scale in every ROS episode (labelled and evaluated alike, so before
    # and after are measured the same way) and in the report's offline frames. 1, as Diffusion
    # Policy samples: below 1 this task's policies drift to left_to_right, the preferred style,
    # whatever the labels (rko_ros.policy.runtime); 0.5 made the pretrained model's first ten ROS
    # episodes 80% preferred-style successes (seed 0), which would measure the knob, not RKO.
    noise_scale: float = 1.0
    # The policy node's chunk_candidates (and the offline rollouts'): each chunk the most coherent
    # of four draws with the plan in hand (rko_ros.policy.runtime.coherent_choice). The style is
    # chosen by the first chunk, which is the first draw either way: the bases fold each style as
    # often with 4 as with 1. On the three final models of 2026-11-29 night, offline, 80 new
    # cloths x four draws, preferred-style success 88.75 -> 90.6%, 86.25 -> 89.7% and
    # 87.8 -> 92.8% (10 of 12 paired draws higher, one lower); on the three demos run with it
    # (2026-11-29 late, two draws) 93.1 / 89.4 / 88.1% at 1 against 93.1 / 90 / 83.1% at 4: a
    # small gain at most, kept for the runs where a carry would drift.
    chunk_candidates: int = 4
    seed: int = 0

    @classmethod
    def quick(cls, **overrides):
        values = dict(demos_per_style=2, pretrain_steps=20, label_episodes=4, eval_episodes=2,
                      finetune_steps=6, image_size_px=(32, 32), batch_size=16,
                      round_min_desirable=0)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        if not 1 <= int(self.label_rounds) <= max(1, int(self.label_episodes)):
            raise ConfigError(f'label_rounds={self.label_rounds} must be 1..label_episodes '
                              f'({self.label_episodes}): every round labels at least one episode')
        if int(self.round_min_desirable) < 0:
            raise ConfigError(f'round_min_desirable={self.round_min_desirable} must be >= 0')
        # The fine-tuning options as FinetuneConfig checks them; the share applies to kto/rko
        # with the retrieval anchor and is left out of the other methods' runs.
        check_finetune_options(
            ConfigError, {'lr': 'finetune_lr', 'select': 'finetune_select',
                          'ema_decay': 'finetune_ema_decay'},
            method=self.method, lr=self.finetune_lr, select=self.finetune_select,
            ema_decay=self.finetune_ema_decay, lambda_retrieved=self.lambda_retrieved,
            retrieved_undesirable_share=self.retrieved_undesirable_share, lambda_sft=self.lambda_sft,
            lambda_u=self.lambda_u, lambda_d=self.lambda_d, share_where_it_applies=True, max_lr=0.1)
        if int(self.finetune_threads) < 0:
            raise ConfigError(f'finetune_threads={self.finetune_threads} must be >= 0 (0 = every '
                              f'core)')
        if int(self.demo_attempts) < 1:
            raise ConfigError(f'demo_attempts={self.demo_attempts} must be >= 1 (1 = keep every '
                              f'demonstration, failed or not)')
        from rko_ros.policy.runtime import check_chunk_candidates, check_noise_scale
        check_noise_scale(self.noise_scale)
        check_chunk_candidates(self.chunk_candidates)
        from rko_ros.policy.config import check_precision
        check_precision(self.pretrain_precision, 'pretrain_precision')
        from rko_ros.sim.render import check_wrist_view_m
        check_wrist_view_m(self.wrist_view_m)
        if self.wrist_view_m and self.shift_px:
            # The shift moves every camera's image with the gripper's positions: right for the
            # fixed scene camera, wrong for one that moves with the gripper.
            raise ConfigError(f'shift_px={self.shift_px} with a wrist camera (wrist_view_m='
                              f'{self.wrist_view_m}): the shift augmentation is for fixed cameras '
                              f'only; set one of them to 0')
        from rko_ros.policy.config import check_event_weight
        check_event_weight(self.event_weight, 'event_weight')   # refused before any demonstration
        if not 0.0 <= float(self.demo_noise) <= 3.0:
            raise ConfigError(f'demo_noise={self.demo_noise} must be 0..3 (1 = the default '
                              f'teleoperator noise, 0 = exact plans)')

    def finetune_undesirable_share(self, method):
        """retrieved_undesirable_share for a fine-tuning with `method`: kto/rko with the retrieval
        anchor on take it, the others have no undesirable windows of their own (0)."""
        return undesirable_share(method, self.lambda_retrieved, self.retrieved_undesirable_share)

    def task_config(self):
        return TaskConfig(image_size_px=tuple(self.image_size_px), wrist_view_m=self.wrist_view_m)

    def camera_topics(self):
        """The cameras' topics, in the order of the policy's camera_names."""
        return topics_of_cameras(self.task_config().camera_names)

    def policy_config(self):
        from rko_ros.policy.config import PolicyConfig
        return PolicyConfig.preset(
            'small', obs={'image_size_px': list(self.image_size_px),
                          'camera_names': list(self.task_config().camera_names),
                          'n_obs_steps': self.n_obs_steps,
                          'joint_names': list(JOINT_NAMES)},
            action={'action_names': list(ACTION_NAMES),
                    'control_rate_hz': self.task_config().control_rate_hz},
            model={'down_dims': [32, 64, 128]},
            train={'steps': self.pretrain_steps, 'batch_size': self.batch_size,
                   'lr': self.pretrain_lr, 'warmup_steps': min(50, self.pretrain_steps // 4 + 1),
                   'seed': self.seed, 'shift_px': self.shift_px,
                   'event_action': 'gripper_closed', 'event_weight': self.event_weight,
                   'precision': self.pretrain_precision,
                   'shift_joints': self.shift_joints() if self.shift_px else {}})

    def shift_joints(self):
        """The sim camera's pixel in metres of table: x along the columns, y up the rows."""
        task = self.task_config()
        per_px = task.view_m / min(task.image_size_px)
        return {'gripper_x': ['col', per_px], 'gripper_y': ['row', -per_px]}


def write_episodes(data_dir, episodes, model_version, rate_hz, progress=None, source='demo',
                   camera_topics=(CAMERA_TOPIC,)):
    """Rollout dicts (images, state, action, result) -> one rosbag2 bag + catalog row each."""
    from rko_ros.demo.offline import episode_cameras
    from rko_ros.episodes.catalog import Catalog
    from rko_ros.episodes.recorder import EpisodeRecorder
    from rko_ros.episodes.synthetic import write_episode
    ids = []
    with Catalog(data_dir) as catalog:
        for episode in episodes:
            result = episode['result'].to_dict()
            meta = {'source': source, 'seed': int(episode['seed']), 'style': episode.get('style')}
            if episode.get('attempt'):
                meta['attempt'] = int(episode['attempt'])
            episode_id = catalog.start_episode(model_version, meta=meta)
            recorder = EpisodeRecorder(catalog.bag_path(episode_id))
            # One image stream per camera; write_episode refuses a count unlike the topics'.
            cameras = list(episode_cameras(episode).swapaxes(0, 1))
            write_episode(recorder, cameras, episode['state'], episode['action'], rate_hz,
                          list(JOINT_NAMES), list(ACTION_NAMES), camera_topic=list(camera_topics))
            stats = recorder.close()
            catalog.finish_episode(episode_id, outcome=result, complete=not stats.get('error'))
            ids.append(episode_id)
            if progress is not None:
                progress.update(1)
    return ids


def record_demonstrations(cfg, progress=None):
    from rko_ros.demo.offline import collect_demonstrations
    episodes = collect_demonstrations(cfg.task_config(), cfg.styles, cfg.demos_per_style,
                                      seed=cfg.seed, noise=cfg.demo_noise, progress=progress,
                                      attempts=cfg.demo_attempts)
    ids = write_episodes(cfg.data_dir, episodes, 'demonstrator', cfg.task_config().control_rate_hz,
                         camera_topics=cfg.camera_topics())
    return ids, episodes


def window_spec(policy_config):
    from rko_ros.episodes.dataset import WindowSpec
    return WindowSpec.from_config(policy_config,
                                  {'cameras': topics_of_cameras(policy_config.obs.camera_names)})


def pretrain(cfg, episode_ids, progress=True):
    """BC on the demonstration bags; writes and activates the first model version."""
    from rko_ros.episodes.dataset import load_windows
    from rko_ros.policy.model import DiffusionPolicy
    from rko_ros.policy.store import ModelStore
    from rko_ros.policy.train import train_bc
    import torch
    torch.manual_seed(cfg.seed)
    policy_config = cfg.policy_config()
    windows = load_windows(cfg.data_dir, episode_ids, window_spec(policy_config), progress=False)
    ema, metrics = train_bc(DiffusionPolicy(policy_config), windows, progress=progress,
                            device=cfg.device)
    store = ModelStore(cfg.data_dir)
    version = store.write_version(ema, parent=None, method='pretrain', activate=True,
                                  card_extra={'episodes': list(episode_ids), 'metrics': metrics})
    return version, metrics


def style_shares(episodes, styles):
    found = [e['result'].style for e in episodes]
    return {s: found.count(s) / max(1, len(found)) for s in styles}


def round_sizes(episodes, rounds):
    """Labelled episodes per round, as even as they go (earlier rounds take the remainder)."""
    base, extra = divmod(int(episodes), int(rounds))
    return [base + (1 if i < extra else 0) for i in range(int(rounds))]


def round_plan(remaining, rounds_left):
    """(planned, cap) for the next round: its even share of the `remaining` labelled episodes,
    and the most it may take when it waits for a desirable label (every later round keeps at
    least half of its share)."""
    planned = round_sizes(remaining, rounds_left)[0]
    if rounds_left <= 1:
        return planned, planned
    return planned, remaining - (rounds_left - 1) * max(1, planned // 2)


def round_done(labelled_in_round, planned, cap, n_good, n_bad, method, min_desirable):
    """Whether a round with `labelled_in_round` episodes stops labelling (n_good / n_bad count
    every label so far: the fine-tuning uses them all)."""
    from rko_ros.alignment.trainer import labels_problem
    if labelled_in_round < planned:
        return False
    if labelled_in_round >= cap or min_desirable <= 0:
        return True
    return n_good >= min_desirable and labels_problem(method, n_good, n_bad) is None


def seeds_for(stage, count, base_seed=0):
    """Disjoint seed ranges per stage, so evaluation never reuses a labelled cloth."""
    offsets = {'label': 100_000, 'before': 200_000, 'after': 300_000, 'bench': 400_000}
    return [base_seed + offsets[stage] + i for i in range(count)]


def ensure_dir(path):
    os.makedirs(path, exist_ok=True)
    return path


def as_jsonable(value):
    """Plain JSON types; NaN and infinities become None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: as_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
