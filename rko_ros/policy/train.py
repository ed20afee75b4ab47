"""Behaviour-cloning pretraining of the diffusion policy on windows (images, state, action chunk).

AdamW, linear warm-up then cosine decay, an EMA copy of the weights (the one returned and exported),
a tqdm bar. Windows: anything with `images`, `state`, `action` numpy arrays (episodes.dataset.Windows,
ArrayWindows below) or any sequence of dicts with those keys.
"""
import copy
import dataclasses
import math
import sys
import time

import numpy as np
import torch

from rko_ros.errors import TrainingError


class ArrayWindows:
    """In-memory windows: images (M,To,N,3,H,W) uint8, state (M,To,S), action (M,H,A) float32."""

    def __init__(self, images, state, action, episode_index=None):
        self.images = np.asarray(images, dtype=np.uint8)
        self.state = np.asarray(state, dtype=np.float32)
        self.action = np.asarray(action, dtype=np.float32)
        m = len(self.action)
        if not (len(self.images) == len(self.state) == m):
            raise TrainingError(f'windows disagree in length: images {len(self.images)}, '
                                f'state {len(self.state)}, action {m}')
        self.episode_index = (np.zeros(m, dtype=np.int64) if episode_index is None
                              else np.asarray(episode_index, dtype=np.int64))

    def __len__(self):
        return len(self.action)

    def __getitem__(self, i):
        return {'images': self.images[i], 'state': self.state[i], 'action': self.action[i]}

    def subset(self, indices):
        indices = np.asarray(indices)
        return ArrayWindows(self.images[indices], self.state[indices], self.action[indices],
                            self.episode_index[indices])


class ShiftAugment:
    """Random translation of a batch's images by up to +-`shift_px` pixels, one shift per window
    (all its frames and cameras alike), edge pixels repeated into the gap. `state_cols` and
    `action_cols`: (column, 'col' or 'row', units per pixel) of the positions that move with the
    image (a fixed top-down camera over the table), so the window shows the same scene moved."""

    def __init__(self, shift_px, state_cols=(), action_cols=()):
        self.shift_px = int(shift_px)
        self.state_cols, self.action_cols = list(state_cols), list(action_cols)

    @classmethod
    def from_config(cls, config, train=None):
        """From train.shift_px / shift_joints (`train` or the PolicyConfig's own); None when
        shift_px is 0."""
        train = train or config.train
        if not train.shift_px:
            return None

        def cols(names):
            return [(names.index(j), axis, per_px) for j, (axis, per_px) in train.shift_joints.items()
                    if j in names]
        return cls(train.shift_px, cols(list(config.obs.joint_names)),
                   cols(list(config.action.action_names)))

    def widen(self, states, actions):
        """Copies of the (M, S) states and (M, A) actions moved by the largest shift both ways,
        appended, so a normalizer fitted on them covers every shifted window."""
        out = []
        for values, cols in ((states, self.state_cols), (actions, self.action_cols)):
            parts = [values]
            for sign in (-1, 1) if cols else ():
                moved = values.copy()
                for col, _axis, per_px in cols:
                    moved[:, col] += sign * self.shift_px * per_px
                parts.append(moved)
            out.append(np.concatenate(parts) if cols else values)
        return out

    def __call__(self, arrays, rng):
        images = arrays['images']
        s, (h, w) = self.shift_px, images.shape[-2:]
        shifts = rng.integers(-s, s + 1, size=(len(images), 2))       # (rows, cols) per window
        pad = [(0, 0)] * (images.ndim - 2) + [(s, s), (s, s)]
        padded = np.pad(images, pad, mode='edge')
        moved = np.empty_like(images)
        for i, (dr, dc) in enumerate(shifts):      # content moves down dr rows and right dc cols
            moved[i] = padded[i, ..., s - dr:s - dr + h, s - dc:s - dc + w]
        out = dict(arrays, images=moved)
        for key, cols in (('state', self.state_cols), ('action', self.action_cols)):
            if cols:
                values = np.array(arrays[key], dtype=np.float32)
                for col, axis, per_px in cols:
                    pixels = shifts[:, 1] if axis == 'col' else shifts[:, 0]
                    values[..., col] += (pixels * per_px).astype(np.float32)[:, None]
                out[key] = values
        return out


def collate(windows, indices, device='cpu', augment=None, rng=None):
    """A batch of torch tensors for the given window indices (`augment(arrays, rng)` first)."""
    indices = np.asarray(indices)
    if all(hasattr(windows, key) for key in ('images', 'state', 'action')):
        arrays = {key: getattr(windows, key)[indices] for key in ('images', 'state', 'action')}
    else:
        items = [windows[int(i)] for i in indices]
        arrays = {key: np.stack([item[key] for item in items]) for key in ('images', 'state', 'action')}
    if augment is not None:
        arrays = augment(arrays, rng)
    return {'images': torch.as_tensor(arrays['images'], dtype=torch.uint8, device=device),
            'state': torch.as_tensor(arrays['state'], dtype=torch.float32, device=device),
            'action': torch.as_tensor(arrays['action'], dtype=torch.float32, device=device)}


def _windows_arrays(windows, key):
    if hasattr(windows, key):
        return np.asarray(getattr(windows, key))
    return np.stack([windows[i][key] for i in range(len(windows))])


def event_windows(config, windows):
    """Boolean mask of the event windows of `config.train.event_action` (see TrainConfig), or None
    when the training samples every window alike.

    A window is an event window when its chunk's first n_action_steps actions of that name, cut
    at the midpoint of the action's range over the windows, are not all the same, or when the
    first of them differs from the joint of the same name (cut alike) in the window's newest
    observation: the gripper closes or opens before the policy plans again."""
    train = config.train
    if train.event_weight == 1.0 or not train.event_action:
        return None
    column = config.action.action_names.index(train.event_action)
    actions = _windows_arrays(windows, 'action')[:, :config.action.n_action_steps, column]
    low, high = float(actions.min()), float(actions.max())
    if not high > low:
        raise TrainingError(f"train.event_action '{train.event_action}' never changes in these "
                            f'windows (always {low:g}), so no window is an event window; set '
                            f'train.event_weight to 1 or name the gripper command')
    cut = 0.5 * (low + high)
    on = actions > cut
    events = on.any(axis=1) & ~on.all(axis=1)
    if train.event_action in config.obs.joint_names:
        joint = config.obs.joint_names.index(train.event_action)
        observed = _windows_arrays(windows, 'state')[:, -1, joint] > cut
        events |= observed != on[:, 0]
    return events


def event_probabilities(events, event_weight):
    """Drawing probabilities with each event window counted `event_weight` times, as from a
    window list holding those windows that many times."""
    weights = np.where(np.asarray(events, dtype=bool), float(event_weight), 1.0)
    return weights / weights.sum()


def window_sampler(n_windows, batch_size, rng, events=None, event_weight=1.0):
    """A function drawing one batch of window indices from `rng` per call: uniformly (the same
    draws as before event weights existed) when `events` is None, else by
    event_probabilities(events, event_weight)."""
    if events is None:
        return lambda: rng.integers(0, n_windows, size=batch_size)
    p = event_probabilities(events, event_weight)
    return lambda: rng.choice(n_windows, size=batch_size, p=p)


def lr_at(step, total, warmup, base_lr):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def adamw(params, lr, weight_decay):
    """AdamW with the fused kernel (one pass over every tensor, on the CPU and on CUDA). On the
    2-core development CPU its update of the demo policy (1.3 M parameters in 181 tensors) took
    3 ms against 15 ms for the default multi-tensor path, about a tenth of a BC step."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


@torch.no_grad()
def ema_update(ema, model, decay):
    # One fused update over all parameters: per-parameter mul_/add_ was a quarter of a BC step on
    # an H100 (12 of ~50 ms, launch-bound) for this small network.
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def bf16_native(device):
    """Whether `device` multiplies bfloat16 natively: a CUDA GPU with bf16 (Ampere or newer), or
    a CPU with AVX512-BF16 or AMX that oneDNN uses. Elsewhere autocast emulates bf16 slowly."""
    dev = torch.device(device)
    if dev.type == 'cuda':
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != 'cpu':
        return False
    try:
        if not (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
    except (AttributeError, RuntimeError):
        return False
    try:  # oneDNN also "supports" bf16 on plain AVX512 by converting; only these flags are fast
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '').split()
    except OSError:
        return True
    return bool({'avx512_bf16', 'amx_bf16'} & set(flags)) if flags else True


def resolve_precision(precision, device):
    """TrainConfig.precision on `device` -> 'fp32' or 'bf16'; a TrainingError for 'bf16' where
    the device has no native bfloat16. 'auto' takes bf16 on such a CPU only: on CUDA ask for it."""
    if precision == 'fp32':
        return 'fp32'
    native = bf16_native(device)
    if precision == 'auto':
        return 'bf16' if native and torch.device(device).type == 'cpu' else 'fp32'
    if precision != 'bf16':
        raise TrainingError(f"train.precision='{precision}' must be fp32, bf16 or auto")
    if not native:
        raise TrainingError(f"train.precision='bf16' on '{device}': this device has no native "
                            f"bfloat16 (a CPU needs AVX512-BF16 or AMX, a GPU Ampere or newer); "
                            f"use 'auto' (bf16 where it is native) or 'fp32'")
    return 'bf16'


def check_device(device):
    """`device` as torch takes it, or a TrainingError that says what is wrong before any work."""
    device = str(device or 'cpu')
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise TrainingError(f"device '{device}' is not a torch device (e.g. 'cpu', 'cuda', "
                            f"'cuda:1'): {exc}") from exc
    if parsed.type == 'cuda':
        if not torch.cuda.is_available():
            raise TrainingError(f"device '{device}' asked for, but this torch ({torch.__version__}) "
                                f'sees no CUDA GPU: install the CUDA build of torch on a GPU '
                                f"machine, or use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise TrainingError(f"device '{device}': only {torch.cuda.device_count()} CUDA "
                                f'device(s) here')
    return device


def train_bc(policy, windows, train_cfg=None, progress=True, fit_normalizer=True, device='cpu',
             log_every=50, on_step=None, cuda_graph=None):
    """Train `policy` in place and return (ema_policy, metrics). The EMA copy is the one to export.

    `cuda_graph` (None: on for a CUDA device) captures one whole step - forward, backward,
    gradient clipping, AdamW and the EMA update - in a CUDA graph after three eager steps and
    replays it: the network is small, so an eager GPU step mostly waits on kernel launches.
    """
    cfg = train_cfg or policy.config.train
    device = check_device(device)
    on_cuda = torch.device(device).type == 'cuda'
    graphed = on_cuda if cuda_graph is None else bool(cuda_graph)
    if graphed and not on_cuda:
        raise TrainingError(f"cuda_graph needs a CUDA device, not '{device}'")
    if len(windows) == 0:
        raise TrainingError('no training windows: record or generate episodes first '
                            '(`rko episodes list` shows what is there)')
    precision = resolve_precision(cfg.precision, device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    precision_ms = None
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    augment = ShiftAugment.from_config(policy.config, cfg)
    if fit_normalizer:
        states = _windows_arrays(windows, 'state')
        actions = _windows_arrays(windows, 'action')
        states, actions = states.reshape(-1, states.shape[-1]), actions.reshape(-1, actions.shape[-1])
        if augment is not None:
            states, actions = augment.widen(states, actions)
        policy.fit_normalizer(states, actions)
    policy.to(device).train()
    if cfg.precision == 'auto' and precision == 'bf16':
        precision, precision_ms = time_precisions(policy, windows, cfg, device, augment)
        if progress:
            timed = ', '.join(f'{p} {ms:.1f} ms' for p, ms in precision_ms.items())
            print(f"precision auto: {precision} (a step timed here: {timed}; bf16 is taken when "
                  f"{AUTO_BF16_MIN_SPEEDUP}x faster)", file=sys.stderr, flush=True)
    ema = copy.deepcopy(policy).eval() if cfg.ema_decay > 0 else policy
    events = event_windows(dataclasses.replace(policy.config, train=cfg), windows)
    draw = window_sampler(len(windows), cfg.batch_size, rng, events, cfg.event_weight)
    step_fn = (GraphedBCStep if graphed else EagerBCStep)(policy, ema, cfg, device, precision)
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc='pretrain (BC)', unit='step', dynamic_ncols=True)
    for step in range(cfg.steps):
        lr = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        batch = collate(windows, draw(), 'cpu' if graphed else device, augment, rng)
        loss = step_fn(batch, lr, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
        if not math.isfinite(loss):
            raise TrainingError(f'BC loss became {loss} at step {step}; lower train.lr '
                                f'(now {cfg.lr}) or check the data for outliers')
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            if step % log_every == 0:
                bar.set_postfix(loss=f'{np.mean(losses[-log_every:]):.4f}')
        if on_step is not None:
            on_step(step, losses[-1])
    if bar is not None:
        bar.close()
    ema.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return ema, {'steps': cfg.steps, 'final_loss': float(np.mean(tail)), 'first_loss': losses[0],
                 'windows': len(windows), 'device': device, 'cuda_graph': graphed,
                 'precision': precision, **({'precision_ms': precision_ms} if precision_ms else {}),
                 **({'event_windows': int(events.sum()), 'event_weight': cfg.event_weight}
                    if events is not None else {})}


# 'auto' takes bf16 only when its steps are at least this much faster than fp32's.
AUTO_BF16_MIN_SPEEDUP = 1.1


def time_precisions(policy, windows, cfg, device, augment=None, steps=8, warmup=3):
    """'auto' on a device with native bfloat16: the faster of fp32 and bf16 for this model and
    batch, timed on a throwaway copy of `policy` (its weights, the torch and numpy random streams
    of the training are left as they were). Returns (precision, {precision: median ms a step}).

    Native is not enough: on a 2-core Intel CPU with AMX a BC step of the cloth demo's policy took
    about as long in bf16 as in fp32, on a 2-core AMD EPYC with AVX512-BF16 64.6 against 74.7 ms
    (interleaved). Costs 2 * (warmup + steps) steps (about 2 s for the demo's policy)."""
    torch_state = torch.get_rng_state()
    rng = np.random.default_rng(12345)
    probe = copy.deepcopy(policy).train()
    runners = {p: EagerBCStep(probe, probe, cfg, device, p) for p in ('fp32', 'bf16')}
    times = {p: [] for p in runners}
    try:
        for i in range(warmup + steps):
            for name, run in runners.items():
                batch = collate(windows, rng.integers(0, len(windows), size=cfg.batch_size),
                                device, augment, rng)
                start = time.perf_counter()
                run(batch, min(cfg.lr, 1e-5), 0.0)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_rng_state(torch_state)
    ms = {name: round(1e3 * float(np.median(t)), 2) for name, t in times.items()}
    chosen = 'bf16' if ms['bf16'] * AUTO_BF16_MIN_SPEEDUP <= ms['fp32'] else 'fp32'
    return chosen, ms


def _autocast(device, precision):
    """The BC forward pass's autocast context: bfloat16 for 'bf16', a no-op for 'fp32'. On CUDA
    without the weight cache, as CUDA graph capture requires."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == 'bf16',
                          cache_enabled=kind != 'cuda')


class EagerBCStep:
    """One BC step as plain torch calls; returns the loss (not stepped when it is not finite)."""

    def __init__(self, policy, ema, cfg, device, precision='fp32'):
        self.policy, self.ema = policy, ema
        self.device, self.precision = device, precision
        self.optimizer = adamw(policy.parameters(), cfg.lr, cfg.weight_decay)

    def __call__(self, batch, lr, ema_decay):
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        with _autocast(self.device, self.precision):
            loss = self.policy.bc_loss(batch).float()
        if not torch.isfinite(loss):
            return loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        if self.ema is not self.policy:
            ema_update(self.ema, self.policy, ema_decay)
        return loss.item()


class GraphedBCStep:
    """The same step captured in one CUDA graph: the batch is copied into fixed buffers, the
    learning rate and EMA weight live in device tensors (AdamW capturable), the timesteps and
    noise come from the CUDA generator, which graphs replay with fresh draws."""

    WARMUP_STEPS = 3

    def __init__(self, policy, ema, cfg, device, precision='fp32'):
        self.policy, self.ema, self.device = policy, ema, device
        self.precision = precision
        self.lr = torch.tensor(float(cfg.lr), device=device)
        self.ema_weight = torch.zeros((), device=device)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=self.lr,
                                           weight_decay=cfg.weight_decay, capturable=True)
        self.static = None
        self.graph = None
        self.loss = None
        self.calls = 0

    def _step(self):
        with _autocast(self.device, self.precision):
            loss = self.policy.bc_loss(self.static).float()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        if self.ema is not self.policy:
            with torch.no_grad():  # ema += w (p - ema), w a device tensor (no host sync)
                ema_params = list(self.ema.parameters())
                diffs = torch._foreach_sub([p.detach() for p in self.policy.parameters()],
                                           ema_params)
                torch._foreach_mul_(diffs, self.ema_weight)
                torch._foreach_add_(ema_params, diffs)
                for b_ema, b in zip(self.ema.buffers(), self.policy.buffers()):
                    b_ema.copy_(b)
        return loss.detach()

    def __call__(self, batch, lr, ema_decay):
        if self.static is None:
            self.static = {k: v.to(self.device) for k, v in batch.items()}
        else:
            for k, v in batch.items():
                self.static[k].copy_(v)
        for group in self.optimizer.param_groups:
            group['lr'].fill_(lr)
        self.ema_weight.fill_(1.0 - ema_decay)
        self.calls += 1
        if self.calls <= self.WARMUP_STEPS:  # eager, on a side stream as capture requires
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss.item()
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._step()
        self.graph.replay()
        return self.loss.item()
