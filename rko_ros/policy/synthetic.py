"""A synthetic multi-modal task: one image, two equally likely action modes (sweep left or right).

Used by tests and benchmarks to check that the diffusion part really models both modes, and by the
alignment tests as the pretrained two-mode policy that preferences then push toward one mode.
"""
import numpy as np

from rko_ros.policy.train import ArrayWindows

LEFT, RIGHT = 0, 1


def mode_trajectory(mode, horizon, action_dim, rng=None, noise=0.02):
    """(H, A): x sweeps to -0.5 (LEFT) or +0.5 (RIGHT), y rises, the rest stays at 0."""
    s = np.linspace(0.0, 1.0, horizon, dtype=np.float32)
    action = np.zeros((horizon, action_dim), dtype=np.float32)
    action[:, 0] = (0.5 if mode == RIGHT else -0.5) * s
    if action_dim > 1:
        action[:, 1] = 0.3 * s
    if rng is not None and noise:
        action += rng.normal(0.0, noise, size=action.shape).astype(np.float32)
    return action


def make_two_mode_windows(config, n=256, seed=0, modes=None):
    """n windows with identical observations; actions split evenly between LEFT and RIGHT.

    Returns (ArrayWindows, modes (n,) int). `modes` may be given to choose the split.
    """
    rng = np.random.default_rng(seed)
    obs, act = config.obs, config.action
    h, w = obs.image_size_px
    image = np.zeros((3, h, w), dtype=np.uint8)
    image[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 180
    images = np.broadcast_to(image, (n, obs.n_obs_steps, len(obs.camera_names), 3, h, w)).copy()
    state = np.zeros((n, obs.n_obs_steps, obs.state_dim), dtype=np.float32)
    if modes is None:
        modes = np.arange(n) % 2
    modes = np.asarray(modes)
    action = np.stack([mode_trajectory(m, act.horizon, act.action_dim, rng) for m in modes])
    return ArrayWindows(images, state, action, episode_index=np.arange(n)), modes


def mode_of(actions):
    """LEFT (0) or RIGHT (1) for each chunk (..., H, A), by the sign of the final x."""
    actions = np.asarray(actions)
    return (actions[..., -1, 0] > 0).astype(np.int64)
