"""Errors raised while reading checkpoints: each names the file, tensor or field at fault."""


class CheckpointError(ValueError):
    """Base class: a checkpoint could not be turned into a complete, correct parameter tree."""


class MissingTensorError(CheckpointError):
    """A tensor the architecture needs is absent from the checkpoint."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds a tensor the architecture does not use (a silent drop would hide a
    wrong architecture or a wrong config)."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape disagrees with the one the config implies."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint describes a model this package does not implement."""


class CorruptCheckpointError(CheckpointError):
    """A file is unreadable, truncated, or not the format its name says."""


class ModelNotInstalledError(CheckpointError):
    """The embedded default model's wheel is not installed."""
