"""The cloth-folding task as a robot sees it: reset, act at `control_rate_hz`, observe, judge.

Action and joint state share the joint names `gripper_x`, `gripper_y` (metres on the table, target
and measured) and `gripper_closed` (command >= 0.5 closes; state 0 or 1). An episode lasts
`episode_ticks` control ticks; stepping past the end keeps simulating (a real robot has no end),
the `done` flag only says the episode's time is up. Imports numpy and the sim modules only.
"""
import dataclasses

import numpy as np

from rko_ros.errors import ConfigError
from rko_ros.sim.cloth import ClothConfig, ClothSim
from rko_ros.sim.evaluate import DEFAULT_QUALITY_THRESHOLD, fold_result
from rko_ros.sim.render import VIEW_M, check_view_m, check_wrist_view_m, parse_size, render

JOINT_NAMES = ('gripper_x', 'gripper_y', 'gripper_closed')
CAMERA_NAMES = ('camera', 'wrist_camera')
ACTION_NAMES = JOINT_NAMES


@dataclasses.dataclass
class TaskConfig:
    image_size_px: tuple = (64, 64)          # (H, W) of `observe()`'s image
    view_m: float = VIEW_M                   # metres of table across the image's shorter side
    # A second camera on the gripper looking down (0: none): the image, the same size as the
    # scene camera's, spans this many metres of table around the gripper's x, y.
    wrist_view_m: float = 0.0
    control_rate_hz: float = 10.0
    episode_ticks: int = 50
    pose_jitter_m: float = 0.02              # uniform +- offset of the cloth's centre at reset
    angle_jitter_rad: float = 0.10           # uniform +- rotation of the cloth at reset
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD
    cloth: ClothConfig = dataclasses.field(default_factory=ClothConfig)

    def __post_init__(self):
        self.image_size_px = parse_size(self.image_size_px)
        if not 1.0 <= float(self.control_rate_hz) <= 100.0:
            raise ConfigError(f'control_rate_hz={self.control_rate_hz} is outside 1..100 Hz')
        if int(self.episode_ticks) < 1:
            raise ConfigError(f'episode_ticks={self.episode_ticks} must be >= 1')
        if not (0.0 <= self.pose_jitter_m <= 0.1 and 0.0 <= self.angle_jitter_rad <= 0.5):
            raise ConfigError(f'pose_jitter_m={self.pose_jitter_m} (0..0.1) or angle_jitter_rad='
                              f'{self.angle_jitter_rad} (0..0.5) out of range')
        self.view_m = check_view_m(self.view_m)
        self.wrist_view_m = check_wrist_view_m(self.wrist_view_m)
        if not 0.0 <= self.quality_threshold <= 1.0:
            raise ConfigError(f'quality_threshold={self.quality_threshold} must be in [0, 1]')

    @property
    def camera_names(self):
        """The cameras `ClothFoldTask.cameras()` returns, scene camera first."""
        return CAMERA_NAMES[:2 if self.wrist_view_m else 1]


class ClothFoldTask:
    """One simulated cloth, one point gripper, one top-down camera (and one on the gripper when
    `wrist_view_m` > 0)."""

    def __init__(self, config=None, **overrides):
        if config is None:
            config = TaskConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.sim = ClothSim(config.cloth)
        self.tick = 0
        self.seed = None
        self.reset(0)

    @property
    def tick_s(self):
        return 1.0 / self.config.control_rate_hz

    @property
    def done(self):
        return self.tick >= self.config.episode_ticks

    @property
    def time_s(self):
        return self.sim.time_s

    def reset(self, seed=None):
        """Lay the cloth flat with a small random pose (from `seed`); returns the seed used."""
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        rng = np.random.default_rng(int(seed))
        cfg = self.config
        center = rng.uniform(-cfg.pose_jitter_m, cfg.pose_jitter_m, size=2)
        angle = rng.uniform(-cfg.angle_jitter_rad, cfg.angle_jitter_rad)
        self.sim.reset(center_xy=center, angle_rad=angle)
        self.tick = 0
        self.seed = int(seed)
        return self.seed

    def step(self, action):
        """Apply one action (target x, target y, grip) for one control tick; returns `done`."""
        action = np.asarray(action, dtype=float).reshape(-1)
        if action.shape != (3,) or not np.all(np.isfinite(action)):
            raise ValueError(f'action {action!r} must be 3 finite numbers {JOINT_NAMES}')
        self.sim.command(action[:2], action[2] >= 0.5)
        self.sim.advance(self.tick_s)
        self.tick += 1
        return self.done

    def state(self):
        """(3,) float32 joint positions: gripper x, y (metres) and closed (0 or 1)."""
        g = self.sim.gripper
        return np.array([g[0], g[1], float(self.sim.gripper_closed)], np.float32)

    def render(self, size_px=None):
        return render(self.sim, self.config.image_size_px if size_px is None else size_px,
                      view_m=self.config.view_m)

    def render_wrist(self, size_px=None):
        """The wrist camera's image: `wrist_view_m` of table around the gripper."""
        if not self.config.wrist_view_m:
            raise ConfigError('this task has no wrist camera (TaskConfig.wrist_view_m is 0)')
        return render(self.sim, self.config.image_size_px if size_px is None else size_px,
                      view_m=self.config.wrist_view_m, center_xy=self.sim.gripper[:2])

    def cameras(self):
        """(N, H, W, 3) uint8: every camera's image, in `config.camera_names` order."""
        images = [self.render()]
        if self.config.wrist_view_m:
            images.append(self.render_wrist())
        return np.stack(images)

    def observe(self):
        """(image (H, W, 3) uint8 RGB, state (3,) float32)."""
        return self.render(), self.state()

    def result(self):
        return fold_result(self.sim, self.config.quality_threshold)


def rollout(task, act, seed=None, record_images=True, extra_sizes=()):
    """Run one episode: `act(image, state, tick) -> action (3,)` is called every tick.

    Returns a dict with `seed`, `images` (T, H, W, 3) uint8 (if recorded; with a wrist camera
    also `wrist_images`, the same shape; `images` is the scene camera's), `state` (T, 3) and
    `action` (T, 3) float32 (observation before the action of the same tick), `result`
    (FoldResult), and `frames[size]` lists for each of `extra_sizes` (e.g. (480, 640) for people).
    """
    seed = task.reset(seed)
    images, wrist, states, actions = [], [], [], []
    frames = {parse_size(s): [] for s in extra_sizes}
    while not task.done:
        image, state = task.observe() if record_images else (None, task.state())
        if record_images and task.config.wrist_view_m:
            wrist.append(task.render_wrist())
        for size in frames:
            frames[size].append(task.render(size))
        action = np.asarray(act(image, state, task.tick), np.float32)
        if record_images:
            images.append(image)
        states.append(state)
        actions.append(action)
        task.step(action)
    for size in frames:
        frames[size].append(task.render(size))
    out = {'seed': seed, 'state': np.stack(states), 'action': np.stack(actions),
           'result': task.result(), 'frames': frames}
    if record_images:
        out['images'] = np.stack(images)
        if wrist:
            out['wrist_images'] = np.stack(wrist)
    return out
