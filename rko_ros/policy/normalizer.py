"""Min-max ("limits") normalisation of states and actions to [-1, 1], fitted on training data.

Stored inside the policy (as buffers) so the checkpoint and the ONNX graph carry it.
"""
import numpy as np
import torch
from torch import nn

# A joint that never moves in the data (e.g. a gripper always open) would divide by zero.
MIN_RANGE = 1e-2


class Normalizer(nn.Module):
    """x_norm = 2 (x - lo) / (hi - lo) - 1 per dimension, for one kind of vector."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer('lo', -torch.ones(dim))
        self.register_buffer('hi', torch.ones(dim))

    def fit(self, values):
        values = np.asarray(values, dtype=np.float64).reshape(-1, self.lo.numel())
        if not np.isfinite(values).all():
            raise ValueError('cannot fit the normalizer: the data holds NaN or inf')
        lo, hi = values.min(axis=0), values.max(axis=0)
        centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, MIN_RANGE / 2)
        self.lo.copy_(torch.as_tensor(centre - half))
        self.hi.copy_(torch.as_tensor(centre + half))
        return self

    def normalize(self, x):
        return 2.0 * (x - self.lo) / (self.hi - self.lo) - 1.0

    def unnormalize(self, x):
        return (x + 1.0) * 0.5 * (self.hi - self.lo) + self.lo
