"""Chi et al.'s CNN diffusion policy: GroupNorm ResNet image encoders + ConditionalUnet1D with FiLM.

The network pieces (`ImageEncoder`, `ConditionalUnet1D`) know nothing of normalisation or noise
schedules; `DiffusionPolicy` owns those and is what training, alignment and export use
(API in docs/interfaces.md). Shapes: B batch, To obs steps, N cameras, H horizon, A action dim,
S state dim. Imports torch; the inference path on the robot uses policy/runtime.py instead.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from rko_ros.policy.config import PolicyConfig
from rko_ros.policy.normalizer import Normalizer
from rko_ros.policy.scheduler import NoiseScheduler


class ResidualBlock2d(nn.Module):
    """Basic ResNet block with GroupNorm (BatchNorm's running stats break under EMA and DDP)."""

    def __init__(self, c_in, c_out, stride, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                   nn.GroupNorm(groups, c_out)))

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.skip(x))


class SpatialSoftmax(nn.Module):
    """Expected image coordinates of K learned keypoint maps: (B, C, h, w) -> (B, 2K)."""

    def __init__(self, channels, num_keypoints):
        super().__init__()
        self.keypoints = nn.Conv2d(channels, num_keypoints, 1)

    def _grid(self, h, w, x):
        # The coordinate grid enters the graph as a float32 constant: traced torch.linspace
        # exports as double arithmetic, which a static-shape export folds into a double tensor
        # that ONNX Runtime's float LayerNormalization then rejects. Cached per size and device,
        # so a training step makes no host-to-device copy (and can be captured in a CUDA graph).
        key = (h, w, x.device, x.dtype)
        cache = self.__dict__.setdefault('_grids', {})
        if key not in cache:
            ys = torch.linspace(-1.0, 1.0, h).tolist()
            xs = torch.linspace(-1.0, 1.0, w).tolist()
            grid = torch.tensor([xs * h, [y for y in ys for _ in range(w)]], dtype=torch.float32)
            cache[key] = grid.to(device=x.device, dtype=x.dtype)
        return cache[key][0], cache[key][1]

    def forward(self, x):
        maps = self.keypoints(x)
        b, k, h, w = maps.shape
        attention = torch.softmax(maps.flatten(2), dim=-1)                       # B,K,hw
        grid_x, grid_y = self._grid(h, w, x)
        return torch.cat([(attention * grid_x).sum(-1), (attention * grid_y).sum(-1)], dim=-1)


class ImageEncoder(nn.Module):
    """One camera's frames (B, 3, H, W) uint8-scaled floats -> features (B, feature_dim)."""

    def __init__(self, channels, blocks_per_stage, feature_dim, groups, strides=()):
        super().__init__()
        strides = tuple(strides) or (1,) + (2,) * (len(channels) - 1)
        layers = [nn.Conv2d(3, channels[0], 5, 2, 2, bias=False), nn.GroupNorm(groups, channels[0]),
                  nn.ReLU()]
        c_prev = channels[0]
        for i, c in enumerate(channels):
            for j in range(blocks_per_stage):
                layers.append(ResidualBlock2d(c_prev, c, strides[i] if j == 0 else 1, groups))
                c_prev = c
        self.trunk = nn.Sequential(*layers)
        self.pool = SpatialSoftmax(c_prev, feature_dim // 2)
        self.out = nn.Sequential(nn.Linear(2 * (feature_dim // 2), feature_dim), nn.LayerNorm(feature_dim))

    def forward(self, x):
        return self.out(self.pool(self.trunk(x)))


class SinusoidalStepEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer('freqs', freqs)

    def forward(self, t):
        angles = t.float().view(-1, 1) * self.freqs.view(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, groups):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                                   nn.GroupNorm(groups, c_out), nn.Mish())

    def forward(self, x):
        return self.block(x)


class FiLMResidualBlock1d(nn.Module):
    """Two conv blocks; the condition scales and shifts the first one's output per channel (FiLM)."""

    def __init__(self, c_in, c_out, cond_dim, kernel_size, groups):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size, groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cond):
        h = self.block1(x)                                        # B,C,H
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.block2(scale * h + bias)
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """Temporal UNet over the action chunk, conditioned on diffusion step + observation features."""

    def __init__(self, action_dim, global_cond_dim, down_dims, kernel_size, groups, step_embed_dim):
        super().__init__()
        self.step_encoder = nn.Sequential(
            SinusoidalStepEmbedding(step_embed_dim), nn.Linear(step_embed_dim, 4 * step_embed_dim),
            nn.Mish(), nn.Linear(4 * step_embed_dim, step_embed_dim))
        cond_dim = step_embed_dim + global_cond_dim
        dims = [action_dim] + list(down_dims)
        pairs = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down.append(nn.ModuleList([
                FiLMResidualBlock1d(c_in, c_out, cond_dim, kernel_size, groups),
                FiLMResidualBlock1d(c_out, c_out, cond_dim, kernel_size, groups),
                nn.Conv1d(c_out, c_out, 3, 2, 1) if not last else nn.Identity()]))
        mid = down_dims[-1]
        self.mid = nn.ModuleList([FiLMResidualBlock1d(mid, mid, cond_dim, kernel_size, groups)
                                  for _ in range(2)])
        self.up = nn.ModuleList()
        # Every up level undoes one of the (len(pairs) - 1) downsamplings.
        for c_in, c_out in reversed(pairs[1:]):
            self.up.append(nn.ModuleList([
                FiLMResidualBlock1d(2 * c_out, c_in, cond_dim, kernel_size, groups),
                FiLMResidualBlock1d(c_in, c_in, cond_dim, kernel_size, groups),
                nn.ConvTranspose1d(c_in, c_in, 4, 2, 1)]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))
        self.num_downsamples = len(pairs) - 1

    def forward(self, sample, timesteps, global_cond):
        # sample: B,H,A -> channels-first B,A,H; timesteps: (B,) or (1,) broadcast over the batch
        x = sample.transpose(1, 2)
        step = self.step_encoder(timesteps).expand(sample.shape[0], -1)
        cond = torch.cat([step, global_cond], dim=-1)
        skips = []
        for block1, block2, downsample in self.down:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for block in self.mid:
            x = block(x, cond)
        for block1, block2, upsample in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(block2(block1(x, cond), cond))
        return self.final(x).transpose(1, 2)


class DiffusionPolicy(nn.Module):
    """Normalisation + observation encoding + noise prediction + DDPM/DDIM, from one PolicyConfig."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        obs, act, mdl, dif = config.obs, config.action, config.model, config.diffusion
        levels = len(mdl.down_dims) - 1
        if act.horizon % (2 ** levels):
            from rko_ros.errors import ConfigError
            raise ConfigError(f'action.horizon={act.horizon} must be divisible by 2^{levels} '
                              f'for model.down_dims={list(mdl.down_dims)}')
        self.state_normalizer = Normalizer(obs.state_dim)
        self.action_normalizer = Normalizer(act.action_dim)
        self.encoders = nn.ModuleList([
            ImageEncoder(mdl.encoder_channels, mdl.encoder_blocks_per_stage, mdl.feature_dim,
                         mdl.n_groups, mdl.encoder_strides) for _ in obs.camera_names])
        self.obs_feature_dim = len(obs.camera_names) * mdl.feature_dim + obs.state_dim
        self.global_cond_dim = obs.n_obs_steps * self.obs_feature_dim
        self.unet = ConditionalUnet1D(act.action_dim, self.global_cond_dim, mdl.down_dims,
                                      mdl.kernel_size, mdl.n_groups, mdl.diffusion_step_embed_dim)
        self.scheduler = NoiseScheduler(dif.num_train_timesteps, dif.beta_schedule,
                                        dif.num_inference_steps)

    # --- normalisation -------------------------------------------------------------------
    def fit_normalizer(self, states, actions):
        """states (M, S) and actions (M, A) from the training data, unnormalized."""
        self.state_normalizer.fit(states)
        self.action_normalizer.fit(actions)

    def normalize_action(self, a):
        return self.action_normalizer.normalize(a)

    def unnormalize_action(self, a):
        return self.action_normalizer.unnormalize(a)

    # --- networks ------------------------------------------------------------------------
    def encode_obs(self, images, state):
        """images (B,To,N,3,H,W) uint8, state (B,To,S) unnormalized -> global_cond (B, D)."""
        b, to = images.shape[0], images.shape[1]
        x = images.float() * (2.0 / 255.0) - 1.0
        features = [encoder(x[:, :, i].reshape(b * to, *x.shape[3:])).view(b, to, -1)
                    for i, encoder in enumerate(self.encoders)]
        features.append(self.state_normalizer.normalize(state.float()))
        return torch.cat(features, dim=-1).reshape(b, -1)

    def predict_noise(self, noisy_action, timesteps, global_cond):
        """noisy_action (B,H,A) normalized, timesteps (B,) long -> eps_hat (B,H,A)."""
        return self.unet(noisy_action, timesteps, global_cond)

    # --- training quantities -------------------------------------------------------------
    def sample_timesteps_and_noise(self, batch_size, horizon=None, generator=None, device=None,
                                   min_timestep=0):
        """t uniform in [min_timestep, T) and standard normal noise for `batch_size` chunks."""
        horizon = horizon or self.config.action.horizon
        device = device or self.scheduler.alphas_cumprod.device
        t = torch.randint(int(min_timestep), self.scheduler.num_train_timesteps, (batch_size,),
                          generator=generator, device=device)
        eps = torch.randn(batch_size, horizon, self.config.action.action_dim,
                          generator=generator, device=device)
        return t, eps

    def denoise_error(self, batch, t, eps, reduction='mean', global_cond=None):
        """Per-sample ||eps - eps_theta(a_t, t, o)||^2 over the chunk -> (B,).

        `global_cond` may be passed when the caller already encoded the observations.
        """
        if global_cond is None:
            global_cond = self.encode_obs(batch['images'], batch['state'])
        a0 = self.normalize_action(batch['action'].float())
        a_t = self.scheduler.add_noise(a0, eps, t)
        sq = (eps - self.predict_noise(a_t, t, global_cond)) ** 2
        return sq.flatten(1).sum(-1) if reduction == 'sum' else sq.flatten(1).mean(-1)

    def forward(self, batch, t, eps, reduction='mean'):
        # DistributedDataParallel calls forward: the per-sample denoising error is what trains.
        return self.denoise_error(batch, t, eps, reduction)

    def bc_loss(self, batch, generator=None):
        t, eps = self.sample_timesteps_and_noise(batch['action'].shape[0], generator=generator,
                                                 device=batch['action'].device)
        return self.denoise_error(batch, t, eps).mean()

    # --- inference -----------------------------------------------------------------------
    def sample(self, images, state, noise, num_inference_steps=None):
        """DDIM from the given noise (B,H,A) -> unnormalized actions (B,H,A)."""
        global_cond = self.encode_obs(images, state)
        x = noise
        steps = self.scheduler.inference_timesteps(num_inference_steps)
        for i, t in enumerate(steps):
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            t_tensor = torch.full((1,), t, dtype=torch.long, device=noise.device)
            eps_hat = self.predict_noise(x, t_tensor, global_cond)
            x = self.scheduler.ddim_step(eps_hat, t, t_prev, x)
        return self.unnormalize_action(x)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())
