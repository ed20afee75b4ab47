"""Top-down RGB camera over the cloth table: what the policy sees and what a person looks at.

Triangles of the cloth grid are painted back to front (by height), the cloth's front and back in
different colours so a folded-over part stands out, shaded by the surface normal (creases darken)
and brightened with height (upper layers lighter). The gripper is a red marker, filled when closed,
growing with its height. Anti-aliased by supersampling (draw large, shrink with area averaging).

Imports numpy and cv2 only: no torch, no rclpy.
"""
import cv2
import numpy as np

from rko_ros.errors import ConfigError

TABLE_RGB = (196, 188, 170)
FRONT_RGB = (52, 110, 190)     # the side facing up before any fold
BACK_RGB = (235, 165, 60)      # the underside, seen only where the cloth is folded over
EDGE_DARKEN = 0.55
GRIPPER_RGB = (220, 30, 40)
RELIEF_SHADING = 0.4          # vertical scale used for shading normals
VIEW_M = 0.60                  # default: the shorter image side shows this many metres of table
VIEW_RANGE_M = (0.1, 5.0)      # views a camera over the table can have
_LIGHT = np.array([-0.35, 0.45, 1.0]) / np.linalg.norm([-0.35, 0.45, 1.0])
_SUBPIXEL_BITS = 4


def parse_size(size_px):
    """(H, W) from (H, W), [H, W], an int (square) or 'WxH' (as in 640x480)."""
    if isinstance(size_px, str):
        try:
            w, h = (int(v) for v in size_px.lower().split('x'))
        except ValueError:
            raise ConfigError(
                f'image size {size_px!r} is not WIDTHxHEIGHT; use e.g. 640x480') from None
        size = (h, w)
    elif np.isscalar(size_px):
        size = (int(size_px), int(size_px))
    else:
        size = tuple(int(v) for v in size_px)
    if len(size) != 2 or not (8 <= size[0] <= 4096 and 8 <= size[1] <= 4096):
        raise ConfigError(f'image size {size_px!r} must be (height, width), each 8..4096 px')
    return size


def _mesh(n):
    """Triangles for an n x n grid: each quad split into four around its centre (so no diagonal is
    favoured and folds along either diagonal look straight). Returns (tris (T, 3) indices into the
    particles followed by the quad centres, quads (Q, 4) particle indices bl, br, tr, tl, and
    border (T,) True where the triangle's first edge lies on the cloth's border)."""
    if n in _CACHE:
        return _CACHE[n]
    idx = np.arange(n * n).reshape(n, n)
    quads = np.stack([idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel(),
                      idx[1:, :-1].ravel()], axis=1)
    centre = n * n + np.arange(len(quads))
    tris = np.concatenate([np.stack([quads[:, k], quads[:, (k + 1) % 4], centre], 1)
                           for k in range(4)])
    rc = np.stack(np.divmod(tris[:, :2], n), axis=-1)          # (T, 2, 2) row, col of edge 0
    border = np.zeros(len(tris), bool)
    for axis in (0, 1):
        same = rc[:, 0, axis] == rc[:, 1, axis]
        border |= same & ((rc[:, 0, axis] == 0) | (rc[:, 0, axis] == n - 1))
    _CACHE[n] = (tris, quads, border)
    return _CACHE[n]


_CACHE = {}


def check_view_m(view_m):
    """`view_m` as a float, or a ConfigError naming it and VIEW_RANGE_M."""
    low, high = VIEW_RANGE_M
    if not low <= float(view_m) <= high:
        raise ConfigError(f'view_m={view_m} must be {low}..{high} metres of table')
    return float(view_m)


def check_wrist_view_m(view_m):
    """`view_m` of a wrist camera as a float: 0 (no wrist camera) or within VIEW_RANGE_M."""
    low, high = VIEW_RANGE_M
    if float(view_m) and not low <= float(view_m) <= high:
        raise ConfigError(f'wrist_view_m={view_m} must be 0 (no wrist camera) or {low}..{high} '
                          f'metres of table')
    return float(view_m)


def render(sim, size_px=(64, 64), draw_gripper=True, view_m=VIEW_M, center_xy=(0.0, 0.0)):
    """Render `sim` (a ClothSim) to an (H, W, 3) uint8 RGB image seen from above; the shorter
    image side spans `view_m` metres of table around `center_xy` (the table's centre; a wrist
    camera passes the gripper's x, y)."""
    height, width = parse_size(size_px)
    cx, cy = (float(v) for v in center_xy)
    view_m = check_view_m(view_m)
    ss = 4 if max(height, width) <= 160 else 2
    big_h, big_w = height * ss, width * ss
    px_per_m = min(big_h, big_w) / view_m
    canvas = np.empty((big_h, big_w, 3), np.uint8)
    canvas[:] = TABLE_RGB
    fix = float(1 << _SUBPIXEL_BITS)

    def to_px(xy):
        return np.stack([big_w / 2.0 + (xy[..., 0] - cx) * px_per_m,
                         big_h / 2.0 - (xy[..., 1] - cy) * px_per_m], -1)

    tris, quads, border = _mesh(sim.n)
    x = np.concatenate([sim.x, sim.x[quads].mean(axis=1)])
    corners = x[tris]                                       # (T, 3, 3)
    # Normals from a vertically flattened copy: a layer resting on a crumpled one has millimetre
    # bumps that would otherwise shade like sharp pyramids; real slopes (a hanging flap) still show.
    flat = corners * np.array([1.0, 1.0, RELIEF_SHADING])
    normal = np.cross(flat[:, 1] - flat[:, 0], flat[:, 2] - flat[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    front_up = normal[:, 2] >= 0
    lit = np.abs(normal @ _LIGHT)
    z_mean = corners[:, :, 2].mean(axis=1)
    brightness = (0.6 + 0.4 * lit) * (1.0 + np.clip(z_mean, 0.0, 0.1) * 2.5)
    base = np.where(front_up[:, None], np.array(FRONT_RGB, float), np.array(BACK_RGB, float))
    colours = np.clip(base * brightness[:, None], 0, 255).astype(int)
    poly = np.round(to_px(corners[:, :, :2]) * fix).astype(np.int32)
    edge_px = max(1, ss // 2)
    for t in np.argsort(z_mean, kind='stable'):
        colour = tuple(int(c) for c in colours[t])
        cv2.fillPoly(canvas, [poly[t]], colour, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
        if border[t]:
            dark = tuple(int(c * EDGE_DARKEN) for c in colours[t])
            cv2.line(canvas, tuple(poly[t, 0]), tuple(poly[t, 1]), dark, edge_px,
                     lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    if draw_gripper:
        g = sim.gripper
        centre = tuple(int(v) for v in np.round(to_px(g[:2]) * fix))
        radius = int(round((0.016 + 0.12 * g[2]) * px_per_m * fix))
        thickness = -1 if sim.gripper_closed else max(1, int(round(0.006 * px_per_m)))
        cv2.circle(canvas, centre, radius, GRIPPER_RGB, thickness, lineType=cv2.LINE_8,
                   shift=_SUBPIXEL_BITS)
    return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
