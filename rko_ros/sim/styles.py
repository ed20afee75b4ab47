"""The fold styles: one definition each, used by the demonstrator (where to grasp, where to go)
and by the evaluator (which particles should end on which, which corners on which).

A style folds the cloth about a line of the grid: the moving half's particle (row, col) should end
on top of its mirror particle. Names say which part goes where, in the cloth's material frame (col
along +x, row along +y before any rotation). Imports numpy only.
"""
import dataclasses

import numpy as np

from rko_ros.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class FoldStyle:
    name: str
    grasp_rc: tuple            # particle the demonstrator grasps, as fractions of (n - 1)
    mirror: str                # 'col' (vertical mid-line), 'row', or 'anti' (anti-diagonal)
    moving: str                # which side moves: 'low' (col/row/row+col below the line) or 'high'

    def moving_and_partner(self, n):
        """(moving (K,) particle indices, partner (K,) indices they should end on top of)."""
        m = n - 1
        row, col = np.divmod(np.arange(n * n), n)
        if self.mirror == 'col':
            key, partner = col * 2 - m, row * n + (m - col)
        elif self.mirror == 'row':
            key, partner = row * 2 - m, (m - row) * n + col
        else:  # anti-diagonal: row + col = m
            key, partner = row + col - m, (m - col) * n + (m - row)
        sel = key < 0 if self.moving == 'low' else key > 0
        return np.nonzero(sel)[0], partner[sel]

    def corner_pairs(self, n):
        """(moving corner indices, the corner each should land on)."""
        m = n - 1
        corners = np.array([0, m, m * n, m * n + m])
        moving, partner = self.moving_and_partner(n)
        lookup = dict(zip(moving.tolist(), partner.tolist()))
        moved = np.array([c for c in corners if c in lookup])
        return moved, np.array([lookup[c] for c in moved])

    def grasp_index(self, n):
        r, c = (int(round(f * (n - 1))) for f in self.grasp_rc)
        return r * n + c


STYLES = {
    s.name: s for s in (
        FoldStyle('left_to_right', (0.5, 0.0), 'col', 'low'),
        FoldStyle('right_to_left', (0.5, 1.0), 'col', 'high'),
        FoldStyle('bottom_to_top', (0.0, 0.5), 'row', 'low'),
        FoldStyle('top_to_bottom', (1.0, 0.5), 'row', 'high'),
        FoldStyle('diagonal', (0.0, 0.0), 'anti', 'low'),   # bottom-left corner onto top-right
    )
}
# The demo's default mix: from the gripper's home below the cloth their first moves head
# left, right and lower-left, so the action distribution is multi-modal from the first ticks.
DEFAULT_STYLES = ('left_to_right', 'right_to_left', 'diagonal')
NO_FOLD = 'none'


def get_style(name):
    if name not in STYLES:
        raise ConfigError(f'fold style {name!r} is unknown; use one of {", ".join(STYLES)}')
    return STYLES[name]
