"""Behaviour-cloning pretraining of the diffusion policy on windows (images, state, action chunk).

AdamW, linear warm-up then cosine decay, an EMA copy of the weights (the one returned and exported),
a tqdm bar. Windows: anything with `images`, `state`, `action` numpy arrays (episodes.dataset.Windows,
ArrayWindows below) or any sequence of dicts with those keys.
"""
import copy
import math

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


def collate(windows, indices, device='cpu'):
    """A batch of torch tensors for the given window indices."""
    indices = np.asarray(indices)
    if all(hasattr(windows, key) for key in ('images', 'state', 'action')):
        arrays = {key: getattr(windows, key)[indices] for key in ('images', 'state', 'action')}
    else:
        items = [windows[int(i)] for i in indices]
        arrays = {key: np.stack([item[key] for item in items]) for key in ('images', 'state', 'action')}
    return {'images': torch.as_tensor(arrays['images'], dtype=torch.uint8, device=device),
            'state': torch.as_tensor(arrays['state'], dtype=torch.float32, device=device),
            'action': torch.as_tensor(arrays['action'], dtype=torch.float32, device=device)}


def _windows_arrays(windows, key):
    if hasattr(windows, key):
        return np.asarray(getattr(windows, key))
    return np.stack([windows[i][key] for i in range(len(windows))])


def lr_at(step, total, warmup, base_lr):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema, model, decay):
    # One fused update over all parameters: per-parameter mul_/add_ was a quarter of a BC step on
    # an H100 (12 of ~50 ms, launch-bound) for this small network.
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


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
             log_every=50, on_step=None):
    """Train `policy` in place and return (ema_policy, metrics). The EMA copy is the one to export."""
    cfg = train_cfg or policy.config.train
    device = check_device(device)
    if len(windows) == 0:
        raise TrainingError('no training windows: record or generate episodes first '
                            '(`rko episodes list` shows what is there)')
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if fit_normalizer:
        states = _windows_arrays(windows, 'state')
        actions = _windows_arrays(windows, 'action')
        policy.fit_normalizer(states.reshape(-1, states.shape[-1]), actions.reshape(-1, actions.shape[-1]))
    policy.to(device).train()
    ema = copy.deepcopy(policy).eval() if cfg.ema_decay > 0 else policy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc='pretrain (BC)', unit='step', dynamic_ncols=True)
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group['lr'] = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        batch = collate(windows, rng.integers(0, len(windows), size=cfg.batch_size), device)
        loss = policy.bc_loss(batch)
        if not torch.isfinite(loss):
            raise TrainingError(f'BC loss became {loss.item()} at step {step}; lower train.lr '
                                f'(now {cfg.lr}) or check the data for outliers')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        if ema is not policy:
            ema_update(ema, policy, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
        losses.append(loss.item())
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
                 'windows': len(windows), 'device': device}
