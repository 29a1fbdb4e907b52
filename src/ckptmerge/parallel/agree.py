"""Agreement on errors: each step of a multi-rank job ends with every rank saying whether it failed.

    with phase():          # every rank runs the block; none leaves before all have finished it
        validate()         # if any rank raised, every rank raises RankError here, in step

Rank 0 raises the first failing rank's message (the CLI prints it); the other ranks raise a quiet
copy, so the error is shown once and every rank exits non-zero. A single process runs the block as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ckptmerge.errors import CkptMergeError
from ckptmerge.parallel.world import all_gather, is_distributed, rank


class RankError(CkptMergeError):
    """An error raised on some rank and agreed on by all; ``quiet`` on every rank but 0."""

    def __init__(self, message: str, *, quiet: bool):
        super().__init__(message)
        self.quiet = quiet


def agree(error: BaseException | None) -> None:
    """Collective: raise RankError on every rank when ``error`` is set on any rank."""
    reports = all_gather(None if error is None else _describe(error))
    failed = [(r, text) for r, text in enumerate(reports) if text is not None]
    if not failed:
        return
    origin, text = failed[0]
    where = "" if origin == 0 else f" (on rank {origin})"
    raise RankError(f"{text}{where}", quiet=rank() != 0) from error


@contextmanager
def phase() -> Iterator[None]:
    """Run the block on every rank, then agree on its outcome (see the module docstring)."""
    if not is_distributed():
        yield
        return
    error = None
    try:
        yield
    except RankError:
        raise  # already agreed by every rank inside the block
    except Exception as exc:  # noqa: BLE001 - carried to every rank by agree()
        error = exc
    agree(error)


def _describe(error: BaseException) -> str:
    if isinstance(error, CkptMergeError):
        return str(error)
    return f"{type(error).__name__}: {error}"
