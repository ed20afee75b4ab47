"""Exceptions shared by every layer. Messages name the thing, the value and the fix.

`rko` prints an RkoError as one line and exits 2; nodes log it and refuse the action or request.
Imports nothing beyond the standard library.
"""


class RkoError(Exception):
    """Base of every error rko_ros raises on purpose (bad input, bad files, bad state)."""


class ConfigError(RkoError, ValueError):
    """A configuration or parameter value is invalid."""


class PolicyInputError(RkoError, ValueError):
    """An observation given to the policy has the wrong shape, dtype, encoding or a NaN."""


class ModelFileError(RkoError):
    """A checkpoint, ONNX file or model card is missing, corrupt or does not match."""


class EpisodeError(RkoError):
    """An episode id, bag or catalog entry is unknown, incomplete or corrupt."""


class TrainingError(RkoError):
    """Fine-tuning or pretraining cannot run with the data or settings given."""


class GuardRejected(TrainingError):
    """Fine-tuning ran, but the execution guard kept no checkpoint: nothing was written.

    MARK is in the message, so a parent that only sees the child's output (trainer_node, the
    demo) can tell this outcome from a failure."""
    MARK = 'no checkpoint kept'
