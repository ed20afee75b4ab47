"""A square cloth on a table, simulated with position-based dynamics, plus a point gripper.

The cloth is a grid of particles in 3-D (x, y on the table, z up). Stretch, shear and bending are
distance constraints between grid neighbours (1 apart, diagonal, 2 apart); the table is the
plane z = 0 with Coulomb-like friction; layers are kept apart by a vertical-only contact between
particles that lie over one another, so a folded half rests on top of the other and the renderer
can draw layers in order. The point gripper picks the particle nearest to it, carries it (lifted)
and lets go.

Grid index convention: particle (row, col) has index row * n + col; col runs along +x (left to
right), row along +y (bottom to top) when the cloth lies unrotated. Units: metres, seconds.

Deterministic: no randomness in here (the task draws the initial pose). Imports numpy only: no cv2,
torch or rclpy.
"""
import dataclasses

import numpy as np

from rko_ros.errors import ConfigError


@dataclasses.dataclass
class ClothConfig:
    """Physical and numerical settings of the cloth and the gripper."""

    grid_n: int = 11                  # particles per side
    side_m: float = 0.30              # cloth edge length
    thickness_m: float = 0.006        # vertical gap kept between layers
    gravity_mps2: float = 9.81
    substeps: int = 6                 # physics steps per control tick
    iterations: int = 3               # constraint passes per substep
    strain_passes: int = 2            # extra stretch-only passes after contacts and friction
    stretch_stiffness: float = 1.0
    shear_stiffness: float = 0.7
    bend_stiffness: float = 0.15
    damping_per_s: float = 1.0        # velocity damping (air drag and internal friction)
    table_friction: float = 0.8       # Coulomb coefficient cloth on table
    cloth_friction: float = 0.5       # Coulomb coefficient cloth on cloth
    table_half_m: float = 0.40        # table is [-half, half]^2; particles are kept over it
    pick_radius_m: float = 0.035      # gripper grasps the nearest particle within this distance
    lift_height_m: float = 0.07       # a closed gripper rises to this height
    gripper_speed_mps: float = 0.6    # horizontal speed limit
    gripper_lift_speed_mps: float = 0.4
    gripper_home_xy: tuple = (0.0, -0.24)
    workspace_half_m: float = 0.30    # gripper targets are clipped to [-half, half]^2

    def __post_init__(self):
        if not 5 <= int(self.grid_n) <= 25:
            raise ConfigError(f'cloth grid_n={self.grid_n} is outside 5..25; use e.g. 11')
        for name in ('side_m', 'thickness_m', 'pick_radius_m', 'lift_height_m',
                     'gripper_speed_mps', 'gripper_lift_speed_mps', 'table_half_m',
                     'workspace_half_m'):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f'cloth {name}={getattr(self, name)} must be > 0')
        if int(self.substeps) < 1 or int(self.iterations) < 1 or int(self.strain_passes) < 0:
            raise ConfigError(f'cloth substeps={self.substeps}, iterations={self.iterations}, '
                              f'strain_passes={self.strain_passes}: need >= 1, >= 1, >= 0')
        for name in ('stretch_stiffness', 'shear_stiffness', 'bend_stiffness'):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f'cloth {name}={getattr(self, name)} must be in [0, 1]')

    @property
    def spacing_m(self):
        return self.side_m / (self.grid_n - 1)


def _grid_edges(n):
    """(a, b, kind) for each distance constraint of an n x n grid: 0 stretch, 1 shear, 2 bend."""
    idx = np.arange(n * n).reshape(n, n)
    edges = []
    pairs = (
        (idx[:, :-1], idx[:, 1:], 0), (idx[:-1, :], idx[1:, :], 0),
        (idx[:-1, :-1], idx[1:, 1:], 1), (idx[:-1, 1:], idx[1:, :-1], 1),
        (idx[:, :-2], idx[:, 2:], 2), (idx[:-2, :], idx[2:, :], 2),
    )
    for a, b, kind in pairs:
        edges.append(np.stack([a.ravel(), b.ravel(), np.full(a.size, kind)], axis=1))
    return np.concatenate(edges)


def _colour_edges(edges, n_particles):
    """Split edges into sets that share no particle, so each set is projected in one numpy step
    (Gauss-Seidel between sets, exact within a set)."""
    colours = []
    used = []
    for edge in edges:
        a, b = int(edge[0]), int(edge[1])
        for k, mask in enumerate(used):
            if not mask[a] and not mask[b]:
                mask[a] = mask[b] = True
                colours[k].append(edge)
                break
        else:
            mask = np.zeros(n_particles, bool)
            mask[a] = mask[b] = True
            used.append(mask)
            colours.append([edge])
    return [np.array(c) for c in colours]


class ClothSim:
    """The cloth, the table and the point gripper. Call `reset`, then `command` and `advance`."""

    def __init__(self, config=None):
        self.config = config or ClothConfig()
        cfg = self.config
        n = cfg.grid_n
        self.n = n
        self.n_particles = n * n
        s = cfg.spacing_m
        edges = _grid_edges(n)
        stiffness = np.array([cfg.stretch_stiffness, cfg.shear_stiffness, cfg.bend_stiffness])
        rest_of_kind = np.array([s, s * np.sqrt(2.0), 2.0 * s])
        # Coloured per kind so the stretch sets can also be run alone (strain limiting).
        self._edge_sets = []
        for kind in range(3):
            for group in _colour_edges(edges[edges[:, 2] == kind], self.n_particles):
                self._edge_sets.append((group[:, 0], group[:, 1], rest_of_kind[kind],
                                        np.full(len(group), stiffness[kind]), kind))
        self.edges = edges[:, :2]
        self.edge_kinds = edges[:, 2]
        self.edge_rest_m = rest_of_kind[edges[:, 2]]
        rc = np.stack(np.divmod(np.arange(self.n_particles), n), axis=1)  # (N, 2) row, col
        self.grid_rc = rc
        # Particles closer than 3 in grid steps are connected through constraints; contact between
        # them would fight the bending at a crease, so layering ignores them.
        grid_gap = np.abs(rc[:, None, :] - rc[None, :, :]).max(axis=2)
        self._layer_pairs = grid_gap >= 3
        self._layer_radius2 = (0.75 * s) ** 2
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self, center_xy=(0.0, 0.0), angle_rad=0.0, gripper_xy=None):
        """Lay the cloth flat, centred at `center_xy`, rotated by `angle_rad`; open the gripper."""
        cfg = self.config
        s = cfg.spacing_m
        rc = self.grid_rc.astype(float)
        local = np.stack([rc[:, 1] * s, rc[:, 0] * s], axis=1) - cfg.side_m / 2.0
        c, sn = np.cos(angle_rad), np.sin(angle_rad)
        rot = np.array([[c, -sn], [sn, c]])
        xy = local @ rot.T + np.asarray(center_xy, float)
        self.x = np.zeros((self.n_particles, 3))
        self.x[:, :2] = xy
        self.v = np.zeros_like(self.x)
        self.inv_mass = np.ones(self.n_particles)
        self.rest_xy = xy.copy()
        home = cfg.gripper_home_xy if gripper_xy is None else gripper_xy
        self.gripper = np.array([home[0], home[1], 0.0])
        self.gripper_target_xy = self.gripper[:2].copy()
        self.gripper_closed = False
        self.grasped = -1
        self.grasp_history = []      # particle index of each grasp since reset, in order
        self._weights_key = None
        self.time_s = 0.0

    @property
    def positions(self):
        """(N, 3) particle positions, a copy."""
        return self.x.copy()

    def index(self, row, col):
        return int(row) * self.n + int(col)

    def corner_indices(self):
        """Corners in the order bottom-left, bottom-right, top-left, top-right (material frame)."""
        m = self.n - 1
        return np.array([self.index(0, 0), self.index(0, m), self.index(m, 0), self.index(m, m)])

    # --------------------------------------------------------------- gripper
    def command(self, target_xy, closed):
        """Set the gripper's target (clipped to the workspace) and grip. Closing grasps the
        particle nearest to the gripper within `pick_radius_m` (upper layers first); opening
        lets go."""
        half = self.config.workspace_half_m
        target = np.asarray(target_xy, float)[:2]
        if not np.all(np.isfinite(target)):
            raise ValueError(f'gripper target {target_xy!r} is not finite')
        self.gripper_target_xy = np.clip(target, -half, half)
        closed = bool(closed)
        if closed and not self.gripper_closed:
            self._grasp()
        elif not closed and self.gripper_closed:
            self._release()
        self.gripper_closed = closed

    def _grasp(self):
        d_xy = np.linalg.norm(self.x[:, :2] - self.gripper[:2], axis=1)
        reachable = (d_xy <= self.config.pick_radius_m) & (self.x[:, 2] <= self.gripper[2]
                                                            + self.config.pick_radius_m)
        if not reachable.any():
            return
        # Prefer the upper layer where layers overlap: a real gripper touches the top first.
        score = np.where(reachable, d_xy - 2.0 * self.x[:, 2], np.inf)
        self.grasped = int(np.argmin(score))
        self.inv_mass[self.grasped] = 0.0
        self.grasp_history.append(self.grasped)

    def _release(self):
        if self.grasped >= 0:
            self.inv_mass[self.grasped] = 1.0
            self.v[self.grasped] = 0.0
        self.grasped = -1

    # --------------------------------------------------------------- physics
    def advance(self, duration_s):
        """Move the gripper toward its target and integrate the cloth for `duration_s` seconds."""
        cfg = self.config
        h = duration_s / cfg.substeps
        g_dt2 = cfg.gravity_mps2 * h * h
        damping = np.exp(-cfg.damping_per_s * h)
        for _ in range(cfg.substeps):
            self._move_gripper(h)
            self.v *= damping
            self.v[:, 2] -= cfg.gravity_mps2 * h
            p = self.x + self.v * h
            if self.grasped >= 0:
                p[self.grasped] = self.gripper
            for _ in range(cfg.iterations):
                self._project_distances(p)
            on_table = p[:, 2] <= 0.0
            p[:, 2] = np.maximum(p[:, 2], 0.0)   # before layering: lower layers rest on the table
            supported = self._project_layers(p)
            on_table &= ~supported
            self._friction(p, on_table, cfg.table_friction * g_dt2)
            self._friction(p, supported, cfg.cloth_friction * g_dt2)
            # Friction and layering undo part of the stretch correction; a few stretch-only passes
            # keep the cloth from looking like rubber when the gripper pulls fast.
            for _ in range(cfg.strain_passes):
                self._project_distances(p, stretch_only=True)
            p[:, 2] = np.maximum(p[:, 2], 0.0)
            half = cfg.table_half_m
            p[:, :2] = np.clip(p[:, :2], -half, half)
            if self.grasped >= 0:
                p[self.grasped] = self.gripper
            self.v = (p - self.x) / h
            self.x = p
        self.time_s += duration_s

    def _move_gripper(self, h):
        cfg = self.config
        delta = self.gripper_target_xy - self.gripper[:2]
        dist = float(np.hypot(*delta))
        step = cfg.gripper_speed_mps * h
        if dist > step:
            delta *= step / dist
        self.gripper[:2] += delta
        z_target = cfg.lift_height_m if self.gripper_closed else 0.0
        dz = np.clip(z_target - self.gripper[2], -cfg.gripper_lift_speed_mps * h,
                     cfg.gripper_lift_speed_mps * h)
        self.gripper[2] += dz

    def _weights(self):
        """Per edge set: (a, b, rest, inverse-mass share of a, of b), recomputed when a grasp
        changes the masses (a grasped particle is immovable: inverse mass 0)."""
        key = self.grasped
        if self._weights_key != key:
            w = self.inv_mass
            self._weights_cache = []
            for a, b, rest, k, kind in self._edge_sets:
                w_sum = w[a] + w[b]
                share = np.where(w_sum > 0, k / np.maximum(w_sum, 1e-12), 0.0)
                self._weights_cache.append((a, b, rest, (w[a] * share)[:, None],
                                            (w[b] * share)[:, None], kind))
            self._weights_key = key
        return self._weights_cache

    def _project_distances(self, p, stretch_only=False):
        for a, b, rest, share_a, share_b, kind in self._weights():
            if stretch_only and kind != 0:
                continue
            d = p[b] - p[a]
            length = np.sqrt(np.einsum('ij,ij->i', d, d))
            corr = d * ((length - rest) / np.maximum(length, 1e-9))[:, None]
            p[a] += share_a * corr
            p[b] -= share_b * corr

    def _project_layers(self, p):
        """Keep a particle at least `thickness_m` above any particle it was above at the start
        of the substep and that lies under it (horizontally within 0.75 grid spacing). Returns
        the mask of particles resting on another layer."""
        z_prev = self.x[:, 2]
        dx = p[:, None, 0] - p[None, :, 0]
        dy = p[:, None, 1] - p[None, :, 1]
        over = (dx * dx + dy * dy < self._layer_radius2) & self._layer_pairs
        order = np.arange(self.n_particles)
        above = (z_prev[:, None] > z_prev[None, :]) | (
            (z_prev[:, None] == z_prev[None, :]) & (order[:, None] > order[None, :]))
        over &= above
        if not over.any():
            return np.zeros(self.n_particles, bool)
        support = np.where(over, p[None, :, 2] + self.config.thickness_m, -np.inf).max(axis=1)
        lifted = (support > p[:, 2]) & (self.inv_mass > 0)
        p[lifted, 2] = support[lifted]
        return lifted

    def _friction(self, p, contact, max_slide_m):
        """Coulomb friction as a position correction: a contact particle sticks if it would slide
        less than mu * g * h^2 this substep, otherwise its slide is shortened by that much."""
        if not contact.any():
            return
        slide = p[contact, :2] - self.x[contact, :2]
        dist = np.sqrt((slide * slide).sum(axis=1))
        keep = np.where(dist > max_slide_m, 1.0 - max_slide_m / np.maximum(dist, 1e-12), 0.0)
        p[contact, :2] = self.x[contact, :2] + slide * keep[:, None]

    # ---------------------------------------------------------------- checks
    def edge_lengths_m(self):
        d = self.x[self.edges[:, 1]] - self.x[self.edges[:, 0]]
        return np.sqrt((d * d).sum(axis=1))
