"""Tell readers that fetch over a network the rows the engine will ask them for, in the order it asks.

``merging/engine.py`` reads a non-mapped input (``file_range`` None) chunk by chunk through ``get_rows``,
input after input. A reader with an ``expect`` method (``io/remote_safetensors.py``) is handed that order up
front, so its range requests run ahead of the merge, all inputs' side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

from ckptmerge.io.tensor_info import CheckpointReader
from ckptmerge.merging.chunk_steps import plan_chunks
from ckptmerge.merging.plan import MergePlan


def announce_reads(plan: MergePlan, readers: Sequence[CheckpointReader], chunk_bytes: int) -> None:
    """Call ``expect([(name, start, stop), ...])`` on each active input that has it: its merged chunks in plan order."""
    wanted = [i for i in plan.active if callable(getattr(readers[i], "expect", None))]
    if not wanted:
        return
    keys = [(c.task.name, c.start, c.stop) for c in plan_chunks(plan, chunk_bytes) if c.task.merged]
    for i in wanted:
        readers[i].expect(keys)
