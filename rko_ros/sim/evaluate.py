"""Judge a finished fold from the cloth's final state: which style it is and how good it is.

Style: for each style in `styles.STYLES`, how far (horizontally) the moving half's particles lie
from the particles they should cover, and whether they lie above them; the closest style whose
moving half is mostly on top wins, or `none` if nothing is close (unfolded, crumpled). Quality in
[0, 1]: the moved corners' distances to their target corners (corner term) and the visible area
against the ideal folded area (coverage term). Why a fold failed: how far (along the cloth, in
metres at rest) the first grasped particle was from the style's grasp particle; on the cloth
task a grasp one particle off the edge's middle (30 mm) is the usual cause of a failed half
fold. Imports numpy only.
"""
import dataclasses

import numpy as np

from rko_ros.sim.styles import NO_FOLD, STYLES

MATCH_TOLERANCE = 0.2        # mean mismatch / side below which a style counts as reached
ON_TOP_FRACTION = 0.6        # share of the moving half that must lie above its partners
CORNER_SCALE = 0.25          # corner error (/ side) at which the corner term reaches 0
AREA_SCALE = 0.5             # relative area error at which the coverage term reaches 0
CORNER_WEIGHT = 0.6
DEFAULT_QUALITY_THRESHOLD = 0.7


@dataclasses.dataclass
class FoldResult:
    style: str                 # a name of styles.STYLES or 'none'
    quality: float             # 0 (bad) .. 1 (corners exactly on corners, ideal area)
    success: bool              # a recognised style with quality >= the threshold
    corner_error_m: float = float('nan')
    coverage_ratio: float = float('nan')   # visible area / ideal folded area
    match_error: dict = dataclasses.field(default_factory=dict)  # style -> mean mismatch / side
    # Rest distance of the first grasped particle from the scored style's grasp particle (0 =
    # the right particle); None when the gripper never held the cloth.
    grasp_offset_m: float = None

    def to_dict(self):
        return {'style': self.style, 'quality': round(float(self.quality), 4),
                'success': bool(self.success),
                'corner_error_m': round(float(self.corner_error_m), 4),
                'coverage_ratio': round(float(self.coverage_ratio), 4),
                'match_error': {k: round(float(v), 4) for k, v in self.match_error.items()},
                'grasp_offset_m': (None if self.grasp_offset_m is None
                                   else round(float(self.grasp_offset_m), 4))}


def visible_area_m2(sim, cell_m=0.003):
    """Area the cloth covers seen from above (overlapping layers counted once), by rasterising the
    grid's triangles on a `cell_m` grid."""
    n = sim.n
    xy = sim.x[:, :2]
    lo = xy.min(axis=0) - cell_m
    shape = np.ceil((xy.max(axis=0) + cell_m - lo) / cell_m).astype(int)
    covered = np.zeros((shape[1], shape[0]), bool)
    idx = np.arange(n * n).reshape(n, n)
    bl, br = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    tl, tr = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tris = np.concatenate([np.stack([bl, br, tr], 1), np.stack([bl, tr, tl], 1)])
    for tri in (xy[tris] - lo) / cell_m:                    # (3, 2) in cells
        c0 = np.floor(tri.min(axis=0)).astype(int)
        c1 = np.ceil(tri.max(axis=0)).astype(int) + 1
        gx, gy = np.meshgrid(np.arange(c0[0], c1[0]) + 0.5, np.arange(c0[1], c1[1]) + 0.5)
        signs = []
        for k in range(3):
            a, b = tri[k], tri[(k + 1) % 3]
            signs.append((b[0] - a[0]) * (gy - a[1]) - (b[1] - a[1]) * (gx - a[0]))
        signs = np.stack(signs)
        inside = (signs >= 0).all(axis=0) | (signs <= 0).all(axis=0)
        covered[c0[1]:c1[1], c0[0]:c1[0]] |= inside
    return float(covered.sum()) * cell_m * cell_m


def style_match(sim, style):
    """(mean horizontal mismatch / side, share of the moving half lying above its partners)."""
    moving, partner = style.moving_and_partner(sim.n)
    x = sim.x
    mismatch = np.linalg.norm(x[moving, :2] - x[partner, :2], axis=1).mean()
    on_top = (x[moving, 2] > x[partner, 2]).mean()
    return float(mismatch / sim.config.side_m), float(on_top)


def fold_quality(sim, style):
    """(quality in [0, 1], mean corner error in metres, coverage ratio) for `style`."""
    side = sim.config.side_m
    moved, target = style.corner_pairs(sim.n)
    corner_error = float(np.linalg.norm(sim.x[moved, :2] - sim.x[target, :2], axis=1).mean())
    coverage = visible_area_m2(sim) / (0.5 * side * side)
    q_corner = np.clip(1.0 - corner_error / (CORNER_SCALE * side), 0.0, 1.0)
    q_area = np.clip(1.0 - abs(coverage - 1.0) / AREA_SCALE, 0.0, 1.0)
    quality = CORNER_WEIGHT * q_corner + (1.0 - CORNER_WEIGHT) * q_area
    return float(quality), corner_error, float(coverage)


def classify_style(sim):
    """(style name or 'none', {style: mean mismatch / side})."""
    errors, best, best_error = {}, NO_FOLD, MATCH_TOLERANCE
    for name, style in STYLES.items():
        mismatch, on_top = style_match(sim, style)
        errors[name] = mismatch
        if on_top >= ON_TOP_FRACTION and mismatch < best_error:
            best, best_error = name, mismatch
    return best, errors


def grasp_offset_m(sim, style):
    """Rest distance (metres) between the first particle grasped since reset and `style`'s
    grasp particle; None if nothing was grasped."""
    if not sim.grasp_history:
        return None
    row, col = divmod(int(sim.grasp_history[0]), sim.n)
    want_row, want_col = divmod(style.grasp_index(sim.n), sim.n)
    return float(np.hypot(row - want_row, col - want_col) * sim.config.spacing_m)


def fold_result(sim, quality_threshold=DEFAULT_QUALITY_THRESHOLD):
    """Classify and score the cloth's current state (call when the episode has ended)."""
    style, errors = classify_style(sim)
    # An unrecognised fold is still scored against its nearest style, so two failures can be
    # ranked (preferences) by how close they came.
    scored = style if style != NO_FOLD else min(errors, key=errors.get)
    quality, corner_error, coverage = fold_quality(sim, STYLES[scored])
    success = style != NO_FOLD and quality >= quality_threshold
    return FoldResult(style, quality, bool(success), corner_error, coverage, errors,
                      grasp_offset_m(sim, STYLES[scored]))
