"""Method-agnostic preference fine-tuning of a diffusion policy (sft, dpo, rpo, kto, rko, fkpd).

The trainer owns everything the methods share: the frozen reference copy, balanced batches, the
shared (t, eps) between policy and reference, observation embeddings for the similarity weights,
model selection by the implied reward margin on held-out labelled windows, early stopping, the
metrics CSV and plot, and the atomic new model version. `losses.py` holds the only per-method code.

Choices the design leaves open (written here and in the card):
- `reduction='sum'` of the denoising error over the chunk (H x A values): the papers' beta of 10-20
  then gives |beta * g| of about 0.1-1 after a few steps, as DESIGN.md asks; with 'mean' the same
  beta gives implied rewards ~50x smaller and the sigmoids stay linear.
- Held-out windows are whole episodes (never windows of a training episode), at least one per class.
- Pairs for dpo/rpo/fkpd: the catalog's explicit preferences when there are any, otherwise every
  (desirable, undesirable) episode pair; the two windows of a pair are taken at the same tick.
- Multi-GPU: when WORLD_SIZE > 1 (torchrun), each rank draws its own batches and gradients are
  averaged by DistributedDataParallel; only rank 0 writes the version.
"""
import copy
import csv
import dataclasses
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from rko_ros.alignment import losses
from rko_ros.alignment.methods import PAIR_METHODS, check_finetune_options
from rko_ros.alignment.weights import rko_weights, similarity_matrix
from rko_ros.errors import GuardRejected, TrainingError
from rko_ros.policy.config import check_event_weight
from rko_ros.policy.train import (ShiftAugment, adamw, collate, ema_update, event_probabilities,
                                   event_windows)


def _episode_means(episode_index, *values):
    """(episodes, inverse, one per-episode mean array per values array) over window arrays."""
    episodes, inverse = np.unique(np.asarray(episode_index), return_inverse=True)
    counts = np.bincount(inverse)
    return (episodes, inverse) + tuple(np.bincount(inverse, weights=v) / counts for v in values)


@dataclasses.dataclass
class FinetuneConfig:
    method: str = 'rko'
    steps: int = 300
    batch_size: int = 32             # windows per batch (half desirable, half undesirable)
    lr: float = 1e-4
    weight_decay: float = 1e-6
    beta: float = None               # None: the paper's value for the method (losses.DEFAULT_BETA)
    tau: float = 0.15
    # [inferred] Centre the similarity embeddings on the labelled windows' mean reference
    # embedding (fixed for the run, detached) before the cosine. Uncentred global conditions share
    # a large common component: on the cloth task their cosines lie in 0.5-1.0 (0.8-1.0 on the
    # synthetic tasks), so at tau 0.15 the weights only span about 0.8-1.3 and rko is kto in
    # all but name. Centred, cosines use [-1, 1]. False = the literal cos(z_w, z_l).
    center_embeddings: bool = True
    lambda_d: float = 1.0
    lambda_u: float = 1.0
    utility: str = 'sigmoid'
    reduction: str = 'sum'
    lambda_fkl: float = 1.0
    # [choice, not in the papers' losses] Optional BC anchor: + lambda_sft * mean denoising error
    # (per dimension) of the desirable windows / pair winners. 0 = the methods exactly as written.
    lambda_sft: float = 0.0
    # [choice] Optional anchor on the behaviour (pretraining demonstration) windows, as FKPD's
    # forward-KL term, for any method: + lambda_behaviour * their mean BC error. Needs `behaviour`.
    lambda_behaviour: float = 0.0
    # EMA of the weights (as in pretraining): the averaged copy is the one evaluated on the
    # held-out windows, kept and exported. 0 = the raw weights.
    ema_decay: float = 0.0
    # [choice, not in the papers] Execution guard on model selection. The held-out margin alone
    # can be widened by wrecking the predictions (both errors rise, the undesirable ones faster:
    # the margin grows while the policy forgets how to act). So each evaluated checkpoint also
    # has its mean denoising error measured on a fixed sample of guard windows with fixed noise,
    # and only one whose error is at most (1 + guard_tolerance) x the reference's may be kept.
    # None of them: the run fails and nothing is written. None = off (the methods as published;
    # `rko finetune` turns it on). The guard windows are the held-out desirable ones
    # ('desirable': what the operator wants done must still be predicted; all desirable windows
    # when none is held out) or the pretraining demonstrations ('behaviour'; these include the
    # styles the labels move away from, so their error rises with any real alignment: in the
    # cloth task it grew 7x while preferred-style success went from 10% to 60%).
    guard_tolerance: float = None
    guard_windows: str = 'desirable'
    holdout_fraction: float = 0.2
    eval_every: int = 25
    patience: int = 6                # evaluations without a better held-out margin before stopping; 0 = never
    # Which evaluated checkpoint is kept (always one within the execution guard): 'margin' = the
    # best held-out margin (the usual early stopping); 'last' = the latest one. With a handful of
    # held-out episodes the margin is noisy, and on the cloth it picked early checkpoints that
    # had not yet learnt the retrieved demonstrations (the demo uses 'last', DemoConfig).
    select: str = 'margin'
    # [choice, not in the papers] Train the action network only; the image encoders keep the
    # parent's weights (the usual few-shot fine-tuning of a visuomotor policy). Cloth demo, the
    # 12000-step base's 20 labels, 1200 steps, 40 new cloths: 70 / 47.5 / 50% preferred-style
    # success frozen (three seeds), 52.5 / 32.5% not; from the 3000-step base 37.5% frozen against
    # 45% for the demo's 300 unfrozen steps. Not a reliable gain over the defaults, so off.
    freeze_encoder: bool = False
    # [choice, not in the papers] Retrieval anchor: + lambda_retrieved * mean BC error of the
    # pretraining demonstrations that resemble the desirable episodes more than the undesirable
    # ones (as Behavior Retrieval, Du et al. 2023, retrieves prior data with a few examples). A
    # demonstration window's feature is the reference's centred observation embedding joined with
    # its normalised action chunk; its score is the class-balanced softmax(cos / retrieval_tau)
    # share of the desirable training windows among all labelled training windows; an episode is
    # retrieved when its windows' mean score is above 0.5. Held-out episodes take no part.
    # The labels' few desirable episodes then come with every demonstration of the same kind:
    # clean examples of what the operator wants, which keep execution while the style moves.
    lambda_retrieved: float = 0.0
    retrieval_tau: float = 0.05
    # A demonstration episode is retrieved when its mean score is above retrieval_threshold
    # (nearer the desirable windows than the undesirable ones) and it lies within reach of the
    # desirable episodes: its distance to them (1 - the mean over its windows of the largest
    # similarity to a desirable window, similarity = the feature cosine / 2) at most
    # retrieval_reach x the largest such leave-one-episode-out distance among the desirable
    # training episodes themselves (needs two of them; 0 = no reach test). The score alone is
    # relative: a style no label shows is retrieved when it is less unlike the desirable
    # episodes than the undesirable ones are. Cloth demo, round 1 with 8 desirable (left_to_right)
    # and 2 undesirable (right_to_left) labels: every diagonal demonstration scored 0.71-0.89 and
    # was retrieved, and the round-1 model folded diagonally 3 times in 10. Distances on three
    # label sets from two demo runs: left_to_right demonstrations 0.005-0.034, diagonal
    # 0.083-0.136, right_to_left 0.24-0.30, the desirable episodes' own reach 0.020-0.030; 2x
    # keeps exactly the preferred style's demonstrations every time, 1.5x dropped one of them.
    retrieval_threshold: float = 0.5
    retrieval_reach: float = 2.0
    # [choice, not in the papers] The same retrieval on the other side: this share of each
    # batch's undesirable windows comes from the demonstration episodes that resemble the
    # undesirable episodes (mean score below 1 - retrieval_threshold, within retrieval_reach of
    # them). A handful of bad episodes shows the unwanted fold from a handful of cloth placements;
    # the demonstrations of the same fold show it from many more, so the push away from it covers
    # the placements no label saw. Needs lambda_retrieved > 0 (the retrieval runs once for both
    # sides); 0 = the undesirable windows are the labelled ones only.
    retrieved_undesirable_share: float = 0.0
    # [choice, not in the papers] Preference interval: the method's own terms (DPO/RPO/KTO/RKO/
    # FKPD, not the BC anchors) are scored at diffusion timesteps >= this only. The high-noise
    # steps decide which kind of chunk is drawn (the mode: which fold); the low-noise steps place
    # it precisely, so the push away from undesirable chunks should not bend the placement. As
    # guidance applied in a limited interval (Kynkaanniemi et al. 2024). Cloth demo, one set of
    # labels, 40 new cloths: grasps off the grasp point 47.5% -> 35% at 50 of 100, but
    # preferred-style success 57.5% -> 52.5% (sft alone moves grasps too: 30%), so 0 = every
    # timestep, the methods as published, is the default.
    preference_min_timestep: int = 0
    # Image shift of the training batches (policy.train.ShiftAugment), with the parent's
    # train.shift_joints. None = the parent's own train.shift_px (what it was pretrained with);
    # 0 = off. Model selection, retrieval and the guard always see the windows unshifted.
    shift_px: int = None
    # The retrieval anchor draws the event windows of the retrieved demonstrations (the gripper
    # closes or opens before the next plan: policy.train.event_windows with the parent's
    # train.event_action) this many times as often as the others, as pretraining can. None = the
    # parent's own train.event_weight; 1 (default) = every retrieved window alike. Offline
    # (2026-11-29 night, the demo's bases pretrained at 3, one round of 20 labelled rollouts,
    # the demo's fine-tuning, 80 new cloths, fine-tuning seeds 0 / 1): preferred-style success
    # at 3 against 1, seed-1 base (4 desirable) 90 / 82.5% against 85 / 77.5%, seed-0 base (7
    # desirable) 85 / 82.5% against 85 / 87.5%: no gain beyond the noise, so off by default.
    event_weight: float = 1.0
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self):
        check_finetune_options(TrainingError, method=self.method, lr=self.lr, select=self.select,
                               ema_decay=self.ema_decay, lambda_retrieved=self.lambda_retrieved,
                               retrieved_undesirable_share=self.retrieved_undesirable_share,
                               lambda_sft=self.lambda_sft, lambda_u=self.lambda_u,
                               lambda_d=self.lambda_d)
        if self.beta is None:
            self.beta = losses.DEFAULT_BETA[self.method]
        if self.reduction not in ('sum', 'mean'):
            raise TrainingError(f"reduction '{self.reduction}' must be 'sum' or 'mean'")
        if self.num_threads < 0:
            raise TrainingError(f'num_threads={self.num_threads} must be >= 0 (0 = one per core)')
        if self.patience < 0:
            raise TrainingError(f'patience={self.patience} must be >= 0 (0 = no early stopping)')
        if self.retrieval_tau <= 0:
            raise TrainingError(f'retrieval_tau={self.retrieval_tau} must be > 0')
        if not 0.0 <= self.retrieval_threshold < 1.0:
            raise TrainingError(f'retrieval_threshold={self.retrieval_threshold} must be in [0, 1)')
        if self.retrieval_reach < 0:
            raise TrainingError(f'retrieval_reach={self.retrieval_reach} must be >= 0 (0 = no reach test)')
        for name in ('lambda_behaviour', 'lambda_fkl'):
            if getattr(self, name) < 0:
                raise TrainingError(f'{name}={getattr(self, name)} must be >= 0')
        if self.guard_windows not in ('desirable', 'behaviour'):
            raise TrainingError(f"guard_windows '{self.guard_windows}' must be 'desirable' or 'behaviour'")
        if self.guard_tolerance is not None and self.guard_tolerance < 0:
            raise TrainingError(f'guard_tolerance={self.guard_tolerance} must be >= 0 (None = off)')
        if self.preference_min_timestep < 0:
            raise TrainingError(f'preference_min_timestep={self.preference_min_timestep} must be '
                                f'>= 0 (0 = every timestep)')
        if self.shift_px is not None and not 0 <= self.shift_px <= 32:
            raise TrainingError(f'shift_px={self.shift_px} must be 0..32 (None = the parent\'s)')
        if self.event_weight is not None:      # None: the parent's train.event_weight
            check_event_weight(self.event_weight, 'event_weight', TrainingError)
        if self.event_weight not in (None, 1.0) and not self.lambda_retrieved:
            raise TrainingError(f'event_weight={self.event_weight} weights the retrieval anchor\'s '
                                f'draws and needs lambda_retrieved > 0')
        if self.steps < 1 or self.batch_size < 2:
            raise TrainingError(f'steps={self.steps} must be >= 1 and batch_size={self.batch_size} >= 2')


class LabelledWindows:
    """Windows with a per-window label (+1 desirable, -1 undesirable) and their episode index."""

    def __init__(self, windows, label, episode_index, episode_ids=None):
        self.windows = windows
        self.label = np.asarray(label, dtype=np.int64)
        self.episode_index = np.asarray(episode_index, dtype=np.int64)
        self.episode_ids = list(episode_ids) if episode_ids is not None else \
            [str(i) for i in range(int(self.episode_index.max()) + 1 if len(self.episode_index) else 0)]

    @classmethod
    def from_dataset(cls, windows):
        """From episodes.dataset.Windows with `.label` (0 = only in a preference, kept for pairs)."""
        return cls(windows, windows.label, windows.episode_index, windows.episode_ids)


def _split_episodes(data, fraction, rng):
    """Hold out whole episodes, at least one desirable and one undesirable when each has >= 2."""
    holdout = []
    for sign in (1, -1):
        episodes = sorted(set(data.episode_index[data.label == sign].tolist()))
        k = int(round(len(episodes) * fraction))
        if len(episodes) >= 2:
            k = max(1, min(k, len(episodes) - 1))
        else:
            k = 0
        holdout += list(rng.choice(episodes, size=k, replace=False)) if k else []
    mask = np.isin(data.episode_index, holdout)
    return np.flatnonzero(~mask), np.flatnonzero(mask), sorted(int(e) for e in holdout)


def labels_problem(method, n_good, n_bad):
    """Why `method` cannot fine-tune on n_good desirable and n_bad undesirable episodes, or None.
    One rule for the trainer (check_labels) and for whoever decides whether to start it."""
    if n_good + n_bad == 0:
        return ('no labelled episodes: label some with feedback/label_last or '
                '`rko episodes label ID good|bad` first')
    if method == 'sft':
        return None if n_good else 'sft needs desirable episodes; none is labelled good'
    if not n_good or not n_bad:
        which = 'desirable (good)' if not n_good else 'undesirable (bad)'
        return (f'{method} needs both desirable and undesirable episodes; there is no {which} one '
                f'({n_good} good, {n_bad} bad). Label more episodes or use --method sft')
    return None


def check_labels(data, method, batch_size):
    pos = np.flatnonzero(data.label > 0)
    neg = np.flatnonzero(data.label < 0)
    problem = labels_problem(method, len(set(data.episode_index[pos].tolist())),
                             len(set(data.episode_index[neg].tolist())))
    if problem:
        raise TrainingError(problem)
    if method != 'sft' and min(len(pos), len(neg)) < 2:
        raise TrainingError(f'too few labelled windows ({len(pos)} good, {len(neg)} bad) for a batch '
                            f'of {batch_size}; record longer or more episodes')


class PreferenceTrainer:
    def __init__(self, policy, data, cfg, behaviour=None, pairs=None, device='cpu', progress=True):
        self.cfg = cfg
        self.device = device
        self.progress = progress
        check_labels(data, cfg.method, cfg.batch_size)
        steps_total = policy.config.diffusion.num_train_timesteps
        if cfg.preference_min_timestep >= steps_total:
            raise TrainingError(f'preference_min_timestep={cfg.preference_min_timestep} leaves no '
                                f'timestep: the model has {steps_total} (use 0..{steps_total - 1})')
        needs = 'fkpd' if cfg.method == 'fkpd' else 'lambda_behaviour' if cfg.lambda_behaviour \
            else 'lambda_retrieved' if cfg.lambda_retrieved else None
        if needs and (behaviour is None or len(behaviour) == 0):
            raise TrainingError(f'{needs} needs the '
                                'behaviour (pretraining) windows; none '
                                'were found for the parent version')
        self.data = data
        self.behaviour = behaviour
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.train_idx, self.holdout_idx, self.holdout_episodes = _split_episodes(
            data, cfg.holdout_fraction, self.rng)
        self.pos = np.intersect1d(self.train_idx, np.flatnonzero(data.label > 0))
        self.neg = np.intersect1d(self.train_idx, np.flatnonzero(data.label < 0))
        if cfg.method != 'sft' and (len(self.pos) == 0 or len(self.neg) == 0):
            raise TrainingError('after holding out episodes for model selection, one label class '
                                'is empty; label more episodes')
        self.pairs = self._episode_pairs(pairs)
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        self.policy = policy.to(device).train()
        self.reference = copy.deepcopy(policy).to(device).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        if cfg.freeze_encoder:
            for p in self.policy.encoders.parameters():
                p.requires_grad_(False)
        self.model = self.policy
        if self.world_size > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
            self.model = torch.nn.parallel.DistributedDataParallel(self.policy)
            self.rng = np.random.default_rng(cfg.seed + self.rank)
        self.ema = copy.deepcopy(self.policy).eval() if cfg.ema_decay > 0 else None
        train = policy.config.train if cfg.shift_px is None else \
            dataclasses.replace(policy.config.train, shift_px=cfg.shift_px)
        self.augment = ShiftAugment.from_config(policy.config, train)
        self.z_center = self._embedding_center() if cfg.method in ('rko', 'rpo') and \
            cfg.center_embeddings else None
        self.retrieved, self.rejected, self.retrieval = self._retrieve() if cfg.lambda_retrieved \
            else (None, None, None)
        self.retrieved_p = self._retrieved_weights()
        self.guard_windows, self.guard_source = self._guard_windows()
        self.guard_reference = self.guard_error(self.reference) \
            if cfg.guard_tolerance is not None else None
        self.optimizer = adamw([p for p in self.policy.parameters() if p.requires_grad], cfg.lr,
                               cfg.weight_decay)
        self.history = []

    # --- batches -------------------------------------------------------------------------
    def _episode_pairs(self, pairs):
        index_of = {eid: i for i, eid in enumerate(self.data.episode_ids)}
        train_eps = set(self.data.episode_index[self.train_idx].tolist())
        out = []
        for winner, loser in pairs or []:
            w, l = index_of.get(winner), index_of.get(loser)
            if w in train_eps and l in train_eps:
                out.append((w, l))
        if not out:
            goods = sorted(set(self.data.episode_index[self.pos].tolist()))
            bads = sorted(set(self.data.episode_index[self.neg].tolist()))
            out = [(w, l) for w in goods for l in bads]
        return out

    def _windows_of(self, episode):
        return np.intersect1d(self.train_idx, np.flatnonzero(self.data.episode_index == episode))

    def _pair_batch(self, n):
        """n (winner window, loser window) pairs at the same tick of a winner and a loser episode."""
        w_idx, l_idx = [], []
        for k in self.rng.integers(0, len(self.pairs), size=n):
            w_eps, l_eps = self.pairs[k]
            w_windows, l_windows = self._windows_of(w_eps), self._windows_of(l_eps)
            j = self.rng.integers(0, len(w_windows))
            w_idx.append(w_windows[j])
            l_idx.append(l_windows[min(int(j * len(l_windows) / len(w_windows)), len(l_windows) - 1)])
        return np.array(w_idx), np.array(l_idx)

    def _balanced(self, n):
        half = n // 2
        if self.cfg.method == 'sft':
            return self.rng.choice(self.pos, size=n), np.ones(n, dtype=np.int64)
        idx = np.concatenate([self.rng.choice(self.pos, size=half), self.rng.choice(self.neg, size=n - half)])
        return idx, np.concatenate([np.ones(half, np.int64), -np.ones(n - half, np.int64)])

    def _batch(self, indices, source=None):
        """A training batch of the labelled windows (or `source`), shifted when the run shifts."""
        return collate(self.data.windows if source is None else source, indices, self.device,
                       self.augment, self.rng)

    # --- one step ------------------------------------------------------------------------
    def _errors(self, batch, t, eps, model=None, extra=None):
        """e_theta (with grad) and e_ref (no grad), same (a_t, t, eps); plus the reference embedding.

        `extra` ((batch, t, eps) of more windows, e.g. the retrieval anchor's) joins the model's
        forward pass, so the step runs the network once; its errors come fourth (None without)."""
        model = model or self.model
        with torch.no_grad():
            cond_ref = self.reference.encode_obs(batch['images'], batch['state'])
            e_ref = self.reference.denoise_error(batch, t, eps, self.cfg.reduction, global_cond=cond_ref)
        n = len(t)
        if extra is not None:
            batch = {k: torch.cat([v, extra[0][k]]) for k, v in batch.items()}
            t, eps = torch.cat([t, extra[1]]), torch.cat([eps, extra[2]])
        if model is self.model and self.world_size > 1:
            e_all = model(batch, t, eps, self.cfg.reduction)  # DDP forward = denoise_error
        else:
            # Frozen encoders are the reference's, so its encoding is this model's too
            # (_retrieval_draw gives no `extra` then).
            e_all = model.denoise_error(batch, t, eps, self.cfg.reduction,
                                        global_cond=cond_ref if self.cfg.freeze_encoder else None)
        e_theta, e_extra = e_all[:n], (e_all[n:] if extra is not None else None)
        if extra is not None and self.cfg.reduction == 'sum':
            # The anchor is a per-dimension mean whatever the method's reduction.
            e_extra = e_extra / (self.policy.config.action.horizon * self.policy.config.action.action_dim)
        if self.z_center is not None:
            centred = cond_ref - self.z_center
            # Windows that sit on the centre (e.g. every window shows the same scene) would be
            # normalised rounding noise: they get the zero vector, i.e. no preferred neighbour.
            tiny = centred.norm(dim=-1, keepdim=True) <= 1e-4 * cond_ref.norm(dim=-1, keepdim=True)
            cond_ref = torch.where(tiny, torch.zeros_like(centred), centred)
        return e_theta, e_ref, F.normalize(cond_ref, dim=-1), e_extra

    @torch.no_grad()
    def _embedding_center(self, max_windows=512, chunk=64):
        """Mean reference embedding of (a fixed sample of) the labelled training windows."""
        idx = np.concatenate([self.pos, self.neg])
        if len(idx) > max_windows:
            idx = np.random.default_rng(99).choice(idx, size=max_windows, replace=False)
        sums = [self.reference.encode_obs(batch['images'], batch['state']).sum(dim=0)
                for _, batch in self._chunks(self.data.windows, idx, chunk)]
        return (sum(sums) / len(idx)).detach()

    @torch.no_grad()
    def _retrieval_features(self, source, idx, center):
        feats = []
        for _, batch in self._chunks(source, idx):
            z = self.reference.encode_obs(batch['images'], batch['state']) - center
            a = self.reference.action_normalizer.normalize(batch['action'].float()).flatten(1)
            feats.append(torch.cat([F.normalize(z, dim=-1), F.normalize(a, dim=-1)], dim=1))
        return torch.cat(feats)

    @torch.no_grad()
    def _retrieve(self, chunk=256):
        """Behaviour window indices of the demonstration episodes nearer the desirable training
        windows than the undesirable ones and within reach of the desirable ones
        (FinetuneConfig.lambda_retrieved, retrieval_threshold, retrieval_reach), and a summary."""
        if len(self.pos) == 0 or len(self.neg) == 0:
            raise TrainingError('lambda_retrieved needs desirable and undesirable training episodes')
        labelled = np.concatenate([self.pos, self.neg])
        desirable = torch.zeros(len(labelled), device=self.device)
        desirable[:len(self.pos)] = 1.0
        center = self.z_center if self.z_center is not None else self._embedding_center()
        keys = self._retrieval_features(self.data.windows, labelled, center)
        # Class-balanced: each class's similarity mass divided by its number of windows.
        balance = torch.where(desirable > 0, 1.0 / len(self.pos), 1.0 / len(self.neg))
        scores, nearest, nearest_bad = [], [], []
        all_idx = np.arange(len(self.behaviour))
        for start in range(0, len(all_idx), chunk):
            q = self._retrieval_features(self.behaviour, all_idx[start:start + chunk], center)
            sim = q @ keys.T
            w = torch.softmax(sim / self.cfg.retrieval_tau, dim=1) * balance
            scores.append(((w * desirable).sum(1) / w.sum(1)).cpu())
            nearest.append((sim[:, :len(self.pos)].max(1).values / 2).cpu())
            nearest_bad.append((sim[:, len(self.pos):].max(1).values / 2).cpu())
        scores, nearest = torch.cat(scores).numpy(), torch.cat(nearest).numpy()
        episode_index = np.asarray(self.behaviour.episode_index)
        ids = list(getattr(self.behaviour, 'episode_ids', None) or
                   [str(i) for i in range(int(episode_index.max()) + 1)])
        episodes, inverse, means, nearness, nearness_bad = _episode_means(
            episode_index, scores, nearest, torch.cat(nearest_bad).numpy())
        distance, distance_bad = 1.0 - nearness, 1.0 - nearness_bad
        reach = self._class_reach(keys[:len(self.pos)], self.pos)
        chosen = means > self.cfg.retrieval_threshold
        if reach is not None and self.cfg.retrieval_reach:
            chosen &= distance <= self.cfg.retrieval_reach * reach
        retrieved = np.flatnonzero(chosen[inverse])
        summary = {'episodes': [ids[e] for e in episodes[chosen]], 'windows': int(len(retrieved)),
                   'of_episodes': len(episodes),
                   'desirable_reach': None if reach is None else round(float(reach), 4),
                   'scores': {ids[e]: round(float(m), 4) for e, m in zip(episodes, means)},
                   'distances': {ids[e]: round(float(d), 4) for e, d in zip(episodes, distance)}}
        rejected = None
        if self.cfg.retrieved_undesirable_share:
            bad_reach = self._class_reach(keys[len(self.pos):], self.neg)
            like_bad = means < 1.0 - self.cfg.retrieval_threshold
            if bad_reach is not None and self.cfg.retrieval_reach:
                like_bad &= distance_bad <= self.cfg.retrieval_reach * bad_reach
            rejected = np.flatnonzero(like_bad[inverse])
            summary['undesirable'] = {
                'episodes': [ids[e] for e in episodes[like_bad]], 'windows': int(len(rejected)),
                'reach': None if bad_reach is None else round(float(bad_reach), 4),
                'distances': {ids[e]: round(float(d), 4) for e, d in zip(episodes, distance_bad)}}
        return retrieved, rejected, summary

    def _class_reach(self, keys, members, chunk=256):
        """The largest leave-one-episode-out distance among one label class's training episodes
        (1 - mean over an episode's windows of the largest similarity to another of its episodes'
        windows), or None with fewer than two of them. `members` are the class's window indices
        (self.pos or self.neg), in the order of `keys`."""
        episode_index = self.data.episode_index[members]
        if len(np.unique(episode_index)) < 2:
            return None
        episode = torch.as_tensor(episode_index, device=keys.device)
        best = []
        for start in range(0, len(keys), chunk):
            sim = (keys[start:start + chunk] @ keys.T) / 2
            sim[episode[start:start + chunk, None] == episode[None, :]] = -math.inf
            best.append(sim.max(1).values.cpu())
        _, _, nearness = _episode_means(episode_index, torch.cat(best).numpy())
        return float(1.0 - nearness.min())

    def _chunks(self, source, idx, chunk=64):
        """(slice into idx, collated batch of source[idx[slice]]) in chunks, for no-grad passes."""
        for start in range(0, len(idx), chunk):
            sl = slice(start, start + chunk)
            yield sl, collate(source, idx[sl], self.device)

    def loss(self, step_rng_batch=None):
        cfg = self.cfg
        n = cfg.batch_size
        if cfg.method in PAIR_METHODS:
            w_idx, l_idx = self._pair_batch(max(1, n // 2))
            m = len(w_idx)
            t, eps = self._preference_noise(m)
            # A pair shares t and eps; each side keeps its own observation.
            batch = self._batch(np.concatenate([w_idx, l_idx]))
            extra = self._retrieval_draw(m)
            e_theta, e_ref, z, e_r = self._errors(batch, t.repeat(2), eps.repeat(2, 1, 1), extra=extra)
            g = e_ref - e_theta
            g_w, g_l = g[:m], g[m:]
            winners = {k: v[:m] for k, v in batch.items()}
            if cfg.method == 'dpo':
                return self._anchored(losses.dpo_loss(g_w, g_l, cfg.beta), e_theta[:m], winners,
                                      retrieved=e_r)
            if cfg.method == 'rpo':
                W = similarity_matrix(z[:m], z[m:], cfg.tau)
                return self._anchored(losses.rpo_loss(g_w, g_l, W, cfg.beta), e_theta[:m], winners,
                                      retrieved=e_r)
            b_idx = self.rng.integers(0, len(self.behaviour), size=m)
            b_batch = self._batch(b_idx, self.behaviour)
            tb, eb = self.policy.sample_timesteps_and_noise(m, device=self.device)
            e_behaviour = self.policy.denoise_error(b_batch, tb, eb, 'mean')
            return self._anchored(losses.fkpd_loss(g_w, g_l, e_behaviour, cfg.beta, cfg.lambda_fkl),
                                  e_theta[:m], winners, retrieved=e_r)
        idx, q = self._balanced(n)
        # The last k undesirable windows (_balanced puts them last) come from the demonstrations
        # retrieved as like the undesirable episodes (retrieved_undesirable_share).
        k = 0 if self.rejected is None or not len(self.rejected) else \
            int(round(cfg.retrieved_undesirable_share * int((q < 0).sum())))
        batch = self._batch(idx[:len(idx) - k])
        if k:
            demos = self._batch(self.rng.choice(self.rejected, size=k), self.behaviour)
            batch = {key: torch.cat([v, demos[key]]) for key, v in batch.items()}
        if cfg.method == 'sft':
            t, eps = self.policy.sample_timesteps_and_noise(len(idx), device=self.device)
            extra = self._retrieval_draw(len(idx))
            if extra is None:
                return self._retrieval_anchor(
                    *losses.sft_loss(self.policy.denoise_error(batch, t, eps, 'mean')), n=len(idx))
            both = {key: torch.cat([v, extra[0][key]]) for key, v in batch.items()}
            errors = self.policy.denoise_error(both, torch.cat([t, extra[1]]),
                                               torch.cat([eps, extra[2]]), 'mean')
            return self._retrieval_anchor(*losses.sft_loss(errors[:len(idx)]), n=len(idx),
                                          errors=errors[len(idx):])
        t, eps = self._preference_noise(len(idx))
        e_theta, e_ref, z, e_r = self._errors(batch, t, eps, extra=self._retrieval_draw(int((q > 0).sum())))
        q_t = torch.as_tensor(q, device=self.device)
        g = e_ref - e_theta
        if cfg.method == 'kto':
            out = losses.kto_loss(g, q_t, cfg.beta, cfg.lambda_d, cfg.lambda_u, cfg.utility)
        else:
            weights = rko_weights(z, q_t, cfg.tau)
            out = losses.rko_loss(g, q_t, weights, cfg.beta, cfg.lambda_d, cfg.lambda_u, cfg.utility)
        good = q_t > 0
        return self._anchored(out, e_theta[good], {k: v[good] for k, v in batch.items()}, retrieved=e_r)

    def _preference_noise(self, n):
        """(t, eps) for the method's own terms: t >= cfg.preference_min_timestep."""
        return self.policy.sample_timesteps_and_noise(n, device=self.device,
                                                      min_timestep=self.cfg.preference_min_timestep)

    def _anchored(self, loss_and_metrics, e_theta_desirable, desirable_batch=None, retrieved=None):
        """The method's loss + lambda_sft * BC error (per dimension) of the desirable samples.

        With a preference interval the method's errors cover the high-noise timesteps only; the
        anchor then scores `desirable_batch` afresh over every timestep. `retrieved`: the
        retrieval anchor's errors when the step's forward pass already computed them."""
        loss, metrics = loss_and_metrics
        if self.cfg.lambda_sft and self.cfg.preference_min_timestep and desirable_batch is not None \
                and len(e_theta_desirable):
            t, eps = self.policy.sample_timesteps_and_noise(len(e_theta_desirable), device=self.device)
            e_theta_desirable = self.model(desirable_batch, t, eps, self.cfg.reduction)  # = denoise_error
        if self.cfg.lambda_behaviour:
            b_idx = self.rng.integers(0, len(self.behaviour), size=max(2, len(e_theta_desirable)))
            b_batch = self._batch(b_idx, self.behaviour)
            tb, eb = self.policy.sample_timesteps_and_noise(len(b_idx), device=self.device)
            e_b = self.policy.denoise_error(b_batch, tb, eb, 'mean').mean()
            metrics = dict(metrics, behaviour_anchor=float(e_b.detach()))
            loss = loss + self.cfg.lambda_behaviour * e_b
        loss, metrics = self._retrieval_anchor(loss, metrics, len(e_theta_desirable), retrieved)
        if not self.cfg.lambda_sft or len(e_theta_desirable) == 0:
            return loss, metrics
        per_dim = e_theta_desirable.mean()
        if self.cfg.reduction == 'sum':
            per_dim = per_dim / (self.policy.config.action.horizon * self.policy.config.action.action_dim)
        metrics = dict(metrics, sft_anchor=float(per_dim.detach()))
        return loss + self.cfg.lambda_sft * per_dim, metrics

    def _retrieval_draw(self, n):
        """(batch, t, eps) of the retrieval anchor's max(2, n) windows, to run in the step's one
        forward pass (_errors' `extra`); None when there is no anchor or the encoders are frozen
        (the anchor then runs on its own, _retrieval_anchor)."""
        if not self.cfg.lambda_retrieved or not len(self.retrieved) or self.cfg.freeze_encoder:
            return None
        r_idx = self._draw_retrieved(max(2, n))
        t, eps = self.policy.sample_timesteps_and_noise(len(r_idx), device=self.device)
        return self._batch(r_idx, self.behaviour), t, eps

    def _retrieved_weights(self):
        """Drawing probabilities of the retrieved windows (FinetuneConfig.event_weight), or None
        for uniform draws (the same draws as before the option existed)."""
        cfg, train = self.cfg, self.policy.config.train
        weight = train.event_weight if cfg.event_weight is None else float(cfg.event_weight)
        if weight == 1.0 or self.retrieved is None or not len(self.retrieved):
            return None
        if not train.event_action:
            raise TrainingError(f'event_weight={weight} needs the parent model\'s '
                                f'train.event_action (the gripper command), and it has none; '
                                f'use event_weight 1')
        config = dataclasses.replace(self.policy.config, train=dataclasses.replace(
            train, event_weight=weight))
        picked = self.behaviour.subset(self.retrieved) if hasattr(self.behaviour, 'subset') \
            else [self.behaviour[int(i)] for i in self.retrieved]
        try:
            events = event_windows(config, picked)
        except TrainingError:       # the gripper never switches in them: nothing to weight
            events = np.zeros(len(self.retrieved), dtype=bool)
        self.retrieval = dict(self.retrieval, event_windows=int(events.sum()), event_weight=weight)
        if not events.any():
            return None
        return event_probabilities(events, weight)

    def _draw_retrieved(self, n):
        """n indices into the behaviour windows, drawn from the retrieved ones."""
        if self.retrieved_p is None:
            return self.rng.choice(self.retrieved, size=n)
        return self.rng.choice(self.retrieved, size=n, p=self.retrieved_p)

    def _retrieval_anchor(self, loss, metrics, n, errors=None):
        """+ lambda_retrieved * mean BC error (per dimension) of n retrieved demonstration windows
        (`errors`: theirs, per window, from the step's forward pass; else drawn and run here)."""
        if not self.cfg.lambda_retrieved or not len(self.retrieved):
            return loss, metrics
        if errors is None:
            r_idx = self._draw_retrieved(max(2, n))
            r_batch = self._batch(r_idx, self.behaviour)
            t, eps = self.policy.sample_timesteps_and_noise(len(r_idx), device=self.device)
            errors = self.policy.denoise_error(r_batch, t, eps, 'mean')
        e_r = errors.mean()
        return loss + self.cfg.lambda_retrieved * e_r, dict(metrics, retrieved_anchor=float(e_r.detach()))

    # --- model selection -----------------------------------------------------------------
    @torch.no_grad()
    def holdout_margin(self, max_windows=256, model=None):
        """Mean implied reward (beta g) of held-out desirable minus undesirable windows, fixed noise."""
        model = model or self.policy
        idx = self.holdout_idx
        if len(idx) == 0:  # too few episodes to hold any out: fall back on the training windows
            idx = np.concatenate([self.pos, self.neg])
        label = self.data.label[idx]
        keep = label != 0
        idx, label = idx[keep], label[keep]
        if len(idx) > max_windows:
            pick = np.random.default_rng(1234).choice(len(idx), size=max_windows, replace=False)
            idx, label = idx[pick], label[pick]
        e_theta, e_ref = self._fixed_noise_errors((model, self.reference), self.data.windows, idx,
                                                  4321, self.cfg.reduction)
        g = (e_ref - e_theta).cpu().numpy()
        r = self.cfg.beta * g if self.cfg.beta else g
        pos, neg = r[label > 0], r[label < 0]
        if len(pos) == 0 or len(neg) == 0:
            return float(r.mean())
        return float(pos.mean() - neg.mean())

    def _guard_windows(self, max_windows=128):
        """(windows, index array) of the guard sample, fixed for the run."""
        if self.cfg.guard_windows == 'behaviour':
            if self.behaviour is None or not len(self.behaviour):
                raise TrainingError("guard_windows 'behaviour' needs the pretraining windows; none "
                                    'were found for the parent version')
            source, pool, name = self.behaviour, np.arange(len(self.behaviour)), 'behaviour'
        else:
            source, name = self.data.windows, 'held-out desirable'
            pool = np.intersect1d(self.holdout_idx, np.flatnonzero(self.data.label > 0))
            if not len(pool):
                pool, name = np.flatnonzero(self.data.label > 0), 'desirable'
        if len(pool) > max_windows:
            pool = np.sort(np.random.default_rng(999).choice(pool, size=max_windows, replace=False))
        return (source, pool), name

    @torch.no_grad()
    def guard_error(self, model):
        """Mean denoising error (per dimension) of `model` on the guard windows, fixed t and noise."""
        (source, idx) = self.guard_windows
        if len(idx) == 0:
            return float('nan')
        (errors,) = self._fixed_noise_errors((model,), source, idx, 8765, 'mean')
        return float(errors.mean())

    @torch.no_grad()
    def _fixed_noise_errors(self, models, source, idx, seed, reduction):
        """Per-window denoising errors of each model on source[idx], with the same seeded t and
        noise every call (evaluations comparable across steps), in eval mode."""
        generator = torch.Generator(device='cpu').manual_seed(seed)
        t, eps = self.policy.sample_timesteps_and_noise(len(idx), generator=generator, device='cpu')
        t, eps = t.to(self.device), eps.to(self.device)
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        errors = [[] for _ in models]
        for sl, batch in self._chunks(source, idx):
            for out, m in zip(errors, models):
                out.append(m.denoise_error(batch, t[sl], eps[sl], reduction))
        for m, mode in zip(models, modes):
            m.train(mode)
        return [torch.cat(e) for e in errors]

    def _within_guard(self, error):
        if self.guard_reference is None:
            return True
        return error <= (1.0 + self.cfg.guard_tolerance) * self.guard_reference

    def _from_rank0(self, value):
        """Under DDP every rank takes rank 0's number, so all make the same early-stopping and
        best-state decisions (and none waits alone in an all-reduce)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def run(self, on_step=None):
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        best_margin, best_state, best_step, evals_without_gain = -math.inf, None, 0, 0
        best_seen, best_guard, guard_rejected = -math.inf, None, 0
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, desc=f'finetune ({cfg.method})', unit='step', dynamic_ncols=True)
        start = time.perf_counter()
        margin = self.holdout_margin()
        for step in range(1, cfg.steps + 1):
            loss, metrics = self.loss()
            if not torch.isfinite(loss):
                raise TrainingError(f'{cfg.method} loss became {float(loss)} at step {step}; lower '
                                    f'--lr (now {cfg.lr}) or --beta (now {cfg.beta})')
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            self.optimizer.step()
            if self.ema is not None:
                ema_update(self.ema, self.policy, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
            kept = self.ema if self.ema is not None else self.policy
            row = {'step': step, 'time_s': round(time.perf_counter() - start, 3), **metrics}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                margin = self._from_rank0(self.holdout_margin(model=kept))
                row['holdout_margin'] = margin
                within = True
                if self.guard_reference is not None:
                    guard = self._from_rank0(self.guard_error(kept))
                    row['guard_error'] = guard
                    within = self._within_guard(guard)
                    guard_rejected += not within
                improved = within and margin > best_seen
                best_seen = margin if improved else best_seen
                evals_without_gain = 0 if improved else evals_without_gain + 1
                if improved if cfg.select == 'margin' else within:
                    best_margin, best_step = margin, step
                    best_guard = row.get('guard_error')
                    best_state = copy.deepcopy(kept.state_dict())
            self.history.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f'{margin:.3f}')
            if on_step is not None:
                on_step(step, row)
            if cfg.patience and evals_without_gain >= cfg.patience:
                break
        if bar is not None:
            bar.close()
        # Only the execution guard can leave the run with nothing to keep.
        kept = best_state is not None or self.guard_reference is None
        if best_state is not None:
            self.policy.load_state_dict(best_state)
        elif not kept:  # every evaluated checkpoint broke the guard: nothing of this run
            self.policy.load_state_dict(self.reference.state_dict())
        elif self.ema is not None:
            self.policy.load_state_dict(self.ema.state_dict())
        self.policy.eval()
        return {'best_step': best_step, 'best_holdout_margin': best_margin, 'steps_run': len(self.history),
                'world_size': self.world_size, 'kept': kept,
                'guard': None if self.guard_reference is None else {
                    'windows': self.guard_source, 'tolerance': self.cfg.guard_tolerance,
                    'reference_error': self.guard_reference, 'kept_error': best_guard,
                    'rejected_evaluations': guard_rejected},
                'holdout_episodes': [self.data.episode_ids[i] for i in self.holdout_episodes],
                'retrieval': self.retrieval,
                'final_loss': self.history[-1]['loss'] if self.history else None}


def write_metrics(history, csv_path, png_path=None, title=''):
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    if png_path:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
        steps = [r['step'] for r in history]
        ax1.plot(steps, [r['loss'] for r in history], lw=0.8)
        ax1.set_ylabel('loss')
        ax1.set_title(title)
        eval_rows = [r for r in history if 'holdout_margin' in r]
        ax2.plot([r['step'] for r in eval_rows], [r['holdout_margin'] for r in eval_rows], 'o-')
        ax2.set_ylabel('held-out implied\nreward margin')
        ax2.set_xlabel('step')
        fig.tight_layout()
        fig.savefig(png_path, dpi=100)
        plt.close(fig)


def finetune(store, parent_version, data, cfg, behaviour=None, pairs=None, device='cpu',
             progress=True, on_step=None, activate=False, card_extra=None):
    """Fine-tune `parent_version` on `data` (LabelledWindows); returns (new_version, summary).

    The new version is written atomically; the active model is not touched unless `activate`.
    """
    policy = store.load_policy(parent_version)
    trainer = PreferenceTrainer(policy, data, cfg, behaviour=behaviour, pairs=pairs, device=device,
                                progress=progress)
    summary = trainer.run(on_step=on_step)
    if not summary['kept']:
        guard = summary['guard']
        lowest = min(r['guard_error'] for r in trainer.history if 'guard_error' in r)
        raise GuardRejected(
            f'{cfg.method}: {GuardRejected.MARK} the denoising error on the {guard["windows"]} '
            f'windows within {1 + guard["tolerance"]:g}x the parent\'s ({guard["reference_error"]:.4g}; '
            f'the best evaluated was {lowest:.4g}): the fine-tuning was degrading how the policy acts, '
            f'so nothing was written and {parent_version} stays as it is. Lower --lr (now {cfg.lr}) '
            f'or --beta (now {cfg.beta}), add --lambda-sft 1, or widen --guard-tolerance (or '
            f'--no-guard).')
    if trainer.rank != 0:
        return None, summary
    used = sorted({data.episode_ids[i] for i in set(data.episode_index[data.label != 0].tolist())})
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, png_path = os.path.join(tmp, 'metrics.csv'), os.path.join(tmp, 'training.png')
        write_metrics(trainer.history, csv_path, png_path, title=f'{cfg.method} from {parent_version}')
        version = store.write_version(
            trainer.policy.cpu(), parent=parent_version, method=cfg.method, activate=activate,
            extra_files={'metrics.csv': csv_path, 'training.png': png_path},
            card_extra={'episodes': used, 'hyperparameters': dataclasses.asdict(cfg),
                        'metrics': summary, **dict(card_extra or {})})
    return version, summary
