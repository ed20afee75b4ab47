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


def _scene(h, w):
    """(3, H, W) uint8: the one scene of the two-mode task, a grey square on black."""
    image = np.zeros((3, h, w), dtype=np.uint8)
    image[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 180
    return image


def make_two_mode_windows(config, n=256, seed=0, modes=None):
    """n windows with identical observations; actions split evenly between LEFT and RIGHT.

    Returns (ArrayWindows, modes (n,) int). `modes` may be given to choose the split.
    """
    rng = np.random.default_rng(seed)
    obs, act = config.obs, config.action
    h, w = obs.image_size_px
    images = np.broadcast_to(_scene(h, w), (n, obs.n_obs_steps, len(obs.camera_names), 3, h, w)).copy()
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


def make_decide_execute_windows(config, n_episodes=32, execute_windows=3, seed=0, modes=None):
    """Episodes of a decide-then-execute task, labelled per episode as an operator would.

    Each episode has one *decision* window (the same scene as `make_two_mode_windows`: sweep LEFT
    or RIGHT, equally likely) followed by `execute_windows` *execution* windows whose scene shows
    the side the sweep went to (a bar on that side, the gripper state at the sweep's end) and whose
    action is the same single continuation for either side (lift: y rises from 0.3 to 0.6). A
    per-episode label marks every window of the episode, so most undesirable windows are
    execution windows that say nothing about the preference: the situation the RKO similarity
    weights are meant for (cloth folding: a grasp choice, then a carry).

    Returns (ArrayWindows, modes per window, decision per window (bool)).
    """
    rng = np.random.default_rng(seed)
    obs, act = config.obs, config.action
    h, w = obs.image_size_px
    if modes is None:
        modes = np.arange(n_episodes) % 2
    modes = np.asarray(modes)
    base = _scene(h, w)
    per_episode = 1 + int(execute_windows)
    images, states, actions, window_modes, decision, episode = [], [], [], [], [], []
    s = np.linspace(0.0, 1.0, act.horizon, dtype=np.float32)
    for e, mode in enumerate(modes):
        side = 0.5 if mode == RIGHT else -0.5
        for k in range(per_episode):
            state = np.zeros(obs.state_dim, np.float32)
            image = base.copy()
            if k == 0:
                action = mode_trajectory(mode, act.horizon, act.action_dim, rng)
            else:
                bar = slice(3 * w // 4, w) if mode == RIGHT else slice(0, w // 4)
                image[0, :, bar] = 255
                state[0] = side
                if obs.state_dim > 1:
                    state[1] = 0.3
                action = np.zeros((act.horizon, act.action_dim), np.float32)
                action[:, 0] = side
                if act.action_dim > 1:
                    action[:, 1] = 0.3 + 0.3 * s
                action += rng.normal(0.0, 0.02, size=action.shape).astype(np.float32)
            images.append(np.broadcast_to(image, (obs.n_obs_steps, len(obs.camera_names), 3, h, w)))
            states.append(np.broadcast_to(state, (obs.n_obs_steps, obs.state_dim)))
            actions.append(action)
            window_modes.append(mode)
            decision.append(k == 0)
            episode.append(e)
    windows = ArrayWindows(np.stack(images), np.stack(states), np.stack(actions),
                           episode_index=np.asarray(episode))
    return windows, np.asarray(window_modes), np.asarray(decision)
