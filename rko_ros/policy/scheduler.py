"""Noise schedules: DDPM forward process for training, deterministic DDIM for inference.

Written in plain torch ops on buffers so the DDIM loop traces into the ONNX graph unrolled.
"""
import math

import torch
from torch import nn


def betas_for(schedule, num_steps):
    if schedule == 'squaredcos_cap_v2':
        # Nichol & Dhariwal's cosine schedule, betas capped at 0.999.
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999)
                 for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float32)
    if schedule == 'linear':
        return torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float32)
    raise ValueError(f'unknown beta schedule {schedule!r}')


class NoiseScheduler(nn.Module):
    def __init__(self, num_train_timesteps=100, beta_schedule='squaredcos_cap_v2',
                 num_inference_steps=10):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.num_inference_steps = num_inference_steps
        betas = betas_for(beta_schedule, num_train_timesteps)
        self.register_buffer('alphas_cumprod', torch.cumprod(1.0 - betas, dim=0))

    def add_noise(self, a0, eps, t):
        """a_t = sqrt(abar_t) a0 + sqrt(1 - abar_t) eps, with t (B,) long."""
        abar = self.alphas_cumprod[t].view(-1, *([1] * (a0.dim() - 1)))
        return abar.sqrt() * a0 + (1.0 - abar).sqrt() * eps

    def inference_timesteps(self, num_steps=None):
        """Descending DDIM timesteps, evenly spaced as in the 'leading' spacing of diffusers."""
        num_steps = num_steps or self.num_inference_steps
        ratio = self.num_train_timesteps // num_steps
        return [int(i * ratio) for i in reversed(range(num_steps))]

    def ddim_step(self, eps_hat, t, t_prev, sample):
        """One deterministic (eta = 0) DDIM update from timestep t to t_prev (-1: the end)."""
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(abar_t)
        a0_hat = (sample - (1 - abar_t).sqrt() * eps_hat) / abar_t.sqrt()
        # Clipping the clean estimate to the normalised range keeps few-step sampling stable.
        a0_hat = a0_hat.clamp(-1.0, 1.0)
        eps_hat = (sample - abar_t.sqrt() * a0_hat) / (1 - abar_t).sqrt()
        return abar_prev.sqrt() * a0_hat + (1 - abar_prev).sqrt() * eps_hat
