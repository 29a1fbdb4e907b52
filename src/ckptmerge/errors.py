"""Exceptions raised by ckptmerge. Every message names the file, the tensor and the fix."""


class CkptMergeError(Exception):
    """Root of every error ckptmerge raises on bad input or bad configuration."""


class CheckpointFormatError(CkptMergeError):
    """A path is not a checkpoint layout ckptmerge can read, or the file is malformed."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A file would need arbitrary unpickling to load; nothing from it was executed."""


class DiscoveryError(CkptMergeError):
    """Checkpoint names in a run directory cannot be ordered (unparsable or duplicate steps)."""


class SelectionError(CkptMergeError):
    """The requested window (last N, spacing, steps) does not exist in the series."""


class ScheduleError(CkptMergeError):
    """A schedule's parameters are missing, invalid, or give coefficients that break the policy."""


class UnknownNameError(CkptMergeError, KeyError):
    """A registry lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PlanMismatchError(CkptMergeError):
    """Checkpoints disagree on key sets, shapes, dtypes or tied tensors."""


class NonFiniteTensorError(CkptMergeError):
    """An input tensor holds NaN or Inf."""


class OutputExistsError(CkptMergeError):
    """The destination exists and --force was not given."""


class ConfigError(CkptMergeError):
    """A recipe (YAML or flags) is invalid; the message lists every problem at once."""


class ShardLayoutError(CkptMergeError):
    """Saved per-rank state (FSDP2 shards) does not fit this run's ranks or shards."""
