"""Scripted demonstrations of the fold styles, with the noise a human teleoperator would add.

The demonstrator looks at the cloth once (at the start of the episode, as a person does before
moving), then plays a smooth plan: reach the style's grasp particle, close, wait for the lift,
carry it over the fold line onto its mirror particle, open, go back home and wait. Each tick's
action is the next point of that plan (an absolute target the gripper can track), so actions look
like those of a position-controlled robot. Noise: grasp point, release point (overshoot and
sideways), speeds, pauses, and a smooth wobble along the way. Imports numpy only.
"""
import numpy as np

from rko_ros.sim.styles import get_style
from rko_ros.sim.task import rollout

APPROACH_SPEED_MPS = 0.28      # mean speed of the reach (min-jerk peaks at 1.875x the mean)
CARRY_SPEED_MPS = 0.20         # for a 0.3 m carry; longer carries go faster (sqrt of length),
CARRY_REFERENCE_M = 0.30       # as a person's would, so every style fits in a 50-tick episode
RETREAT_SPEED_MPS = 0.32
# Where to let go, along the fold direction, relative to the grasped particle's partner (metres;
# negative = short of it). Tuned on the simulator: a half fold released right over the far edge
# slides off it as it drops; a corner fold drapes short, so it is released slightly beyond.
RELEASE_OFFSET_M = {'diagonal': 0.007}
DEFAULT_RELEASE_OFFSET_M = -0.02


def _min_jerk(start, end, ticks):
    """(ticks, 2) points after `start` ending exactly at `end`."""
    tau = np.arange(1, ticks + 1) / ticks
    s = 10 * tau ** 3 - 15 * tau ** 4 + 6 * tau ** 5
    return start + (end - start) * s[:, None]


class ScriptedDemonstrator:
    """`reset(task, seed)` plans from the task's cloth; `act()` returns the next action (3,)."""

    def __init__(self, style, noise=1.0):
        self.style = get_style(style)
        self.noise = float(noise)
        self._plan = np.zeros((0, 3), np.float32)
        self._next = 0

    def reset(self, task, seed=None):
        sim = task.sim
        rng = np.random.default_rng(seed)
        k = self.noise
        n = sim.n
        grasp = sim.x[self.style.grasp_index(n), :2].copy()
        moving, partner = self.style.moving_and_partner(n)
        target = sim.x[dict(zip(moving.tolist(), partner.tolist()))[self.style.grasp_index(n)], :2]
        fold_dir = (target - grasp) / max(np.linalg.norm(target - grasp), 1e-9)
        side_dir = np.array([-fold_dir[1], fold_dir[0]])
        grasp = grasp + k * np.clip(rng.normal(0.0, 0.006, 2), -0.012, 0.012)
        offset = RELEASE_OFFSET_M.get(self.style.name, DEFAULT_RELEASE_OFFSET_M)
        release = (target + fold_dir * (offset + k * rng.uniform(-0.015, 0.015))
                   + side_dir * k * np.clip(rng.normal(0.0, 0.006), -0.012, 0.012))
        home = sim.gripper[:2].copy()
        home_back = home + k * rng.normal(0.0, 0.01, 2)

        def speed(mean):
            return mean * (1.0 + k * rng.uniform(-0.12, 0.12))

        carry_m = float(np.linalg.norm(release - grasp))
        carry_speed = CARRY_SPEED_MPS * np.sqrt(max(carry_m, 0.05) / CARRY_REFERENCE_M)

        def segment(start, end, mean_speed, closed):
            ticks = max(3, int(np.ceil(np.linalg.norm(end - start) / (mean_speed * task.tick_s))))
            path = _min_jerk(start, end, ticks)
            # A smooth wobble that vanishes at both ends, so grasp and release points are kept.
            phase = rng.uniform(0, 2 * np.pi, 2)
            tau = np.arange(1, ticks + 1) / ticks
            wobble = (k * 0.004 * np.sin(np.pi * tau)[:, None]
                      * np.sin(2 * np.pi * tau[:, None] * rng.uniform(0.5, 1.5) + phase))
            path = path + wobble
            return np.concatenate([path, np.full((ticks, 1), float(closed))], axis=1)

        def hold(point, ticks, closed):
            return np.tile([point[0], point[1], float(closed)], (ticks, 1))

        plan = [
            segment(home, grasp, speed(APPROACH_SPEED_MPS), False),
            hold(grasp, 1 + int(rng.integers(0, 2 if k > 0 else 1)), True),    # close, lift
            hold(grasp, 1, True),
            segment(grasp, release, speed(carry_speed), True),
            hold(release, 1, False),                                           # open
            segment(release, home_back, speed(RETREAT_SPEED_MPS), False),
        ]
        self._plan = np.concatenate(plan).astype(np.float32)
        self._next = 0
        return self

    @property
    def plan_ticks(self):
        return len(self._plan)

    def act(self, *_ignored):
        """Next action (x, y, closed) as float32 (3,); holds the last one when the plan is done.
        Accepts and ignores (image, state, tick) so it can be passed to `task.rollout`."""
        if not len(self._plan):
            raise RuntimeError('call reset(task, seed) before act()')
        action = self._plan[min(self._next, len(self._plan) - 1)]
        self._next += 1
        return action.copy()


def demo_episode(task, style, seed, noise=1.0, record_images=True, extra_sizes=(), attempt=0):
    """Reset `task` with `seed`, fold in `style`, return `task.rollout`'s dict (plus `style` and
    `attempt`). `attempt` > 0 is the same cloth demonstrated again with a new noise draw."""
    demo = ScriptedDemonstrator(style, noise)
    noise_seed = None if seed is None else seed + 7919 + 1_000_003 * int(attempt)

    def act(image, state, tick):
        if tick == 0:
            demo.reset(task, seed=noise_seed)
        return demo.act()

    out = rollout(task, act, seed=seed, record_images=record_images, extra_sizes=extra_sizes)
    out['style'], out['attempt'] = style, int(attempt)
    return out
