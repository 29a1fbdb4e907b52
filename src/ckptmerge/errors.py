"""Exceptions raised by ckptmerge. Every message names the file, the tensor and the fix.

``import_optional`` is the one way to import a package of an optional extra (Optuna, SciPy, matplotlib,
trackers): when it is missing, the error names the extra that installs it.
"""

import importlib


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


class DataError(CkptMergeError):
    """A ``--data`` source is missing, unreadable, or holds the wrong kind of content."""


class TokenizerError(CkptMergeError):
    """No tokenizer was found for a model, or the one given cannot be loaded from local files."""


class ModelLoadError(CkptMergeError):
    """A model cannot be built for evaluation: missing path, missing config, keys or shapes that do not fit."""


class MissingExtraError(CkptMergeError):
    """An optional package is not installed; the message names the ``pip install 'ckptmerge[EXTRA]'`` that adds it."""


def import_optional(module: str, *, extra: str, needed_by: str):
    """``module``, imported; or MissingExtraError, e.g. "search needs the optional package optuna:
    pip install 'ckptmerge[search]'". An ImportError raised inside an installed package is left as it is."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != package:
            raise
        raise MissingExtraError(f"{needed_by} needs the optional package {package}: "
                                f"pip install 'ckptmerge[{extra}]'") from None
