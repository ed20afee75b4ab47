"""Checkpoints: config + normalizer + weights (+ EMA weights) in one torch file, written atomically."""
import os
import tempfile

import torch

from rko_ros.errors import ModelFileError
from rko_ros.policy.config import PolicyConfig
from rko_ros.policy.model import DiffusionPolicy

FORMAT = 'rko_ros.policy/1'


def save_checkpoint(path, policy, extra=None):
    """Write `policy` (its weights are the ones used for inference, e.g. the EMA copy) to `path`.
    The weights are stored as CPU tensors, whatever device the policy trained on."""
    state = {k: v.detach().cpu() for k, v in policy.state_dict().items()}
    payload = {'format': FORMAT, 'config': policy.config.to_dict(),
               'state_dict': state, 'extra': dict(extra or {})}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.checkpoint-', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, map_location='cpu', with_extra=False):
    """Load a DiffusionPolicy; a missing, truncated or foreign file raises ModelFileError."""
    if not os.path.isfile(path):
        raise ModelFileError(f'checkpoint {path} does not exist; train one with `rko train` '
                             f'or pick a version from `models/`')
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a damaged zip/pickle
        raise ModelFileError(f'checkpoint {path} is corrupt or truncated ({type(exc).__name__}: '
                             f'{exc}); restore it from a backup or retrain') from exc
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise ModelFileError(f'checkpoint {path} is not an rko_ros policy checkpoint '
                             f'(format {payload.get("format") if isinstance(payload, dict) else "?"}'
                             f', expected {FORMAT})')
    policy = DiffusionPolicy(PolicyConfig.from_dict(payload['config']))
    try:
        policy.load_state_dict(payload['state_dict'])
    except RuntimeError as exc:
        raise ModelFileError(f'checkpoint {path} does not match its own config: {exc}') from exc
    policy.eval()
    return (policy, payload.get('extra', {})) if with_extra else policy
