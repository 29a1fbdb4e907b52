"""Megatron-core ``dist_checkpointing`` (``torch_dist``): ``iter_000000N/`` DCP folders with ``common.pt``.

Layer weights are stored stacked over layers (``decoder.layers.*`` with a leading layer axis);
they are merged as stacks, element by element, which is the same as merging each layer.
``_extra_state`` entries (Transformer Engine state) are skipped. The step is ``iteration`` in
``common.pt`` (its ``args`` Namespace is an inert placeholder); tokens are
``args.consumed_train_samples * args.seq_length`` when both are recorded.
``latest_checkpointed_iteration.txt`` names the newest and is skipped.
"""

from __future__ import annotations

from pathlib import Path

from ckptmerge.io.layouts.base import Layout, StepInfo, as_int, dcp_reader, payload, step_from_name

# Readers (and torch) load inside the functions that open or rewrite checkpoints: discovery stays torch-free.

COMMON = "common.pt"
TRACKER = "latest_checkpointed_iteration.txt"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / COMMON).is_file()


def pointer(path: Path) -> str | None:
    return "Megatron's pointer to the newest iteration" if path.name == TRACKER else None


def read_step(path: Path) -> StepInfo:
    from ckptmerge.io.safe_pickle import Placeholder, state_fields

    common = payload(path / COMMON)
    step = as_int(common.get("iteration")) if isinstance(common, dict) else None
    if step is None:
        return StepInfo(step_from_name(path, r"^iter_(\d+)$"))
    args = common.get("args")
    fields = state_fields(args) if isinstance(args, Placeholder) else vars(args) if args is not None else {}
    samples, seq = as_int(fields.get("consumed_train_samples")), as_int(fields.get("seq_length"))
    return StepInfo(step, tokens_seen=samples * seq if samples and seq else None, source=f"{COMMON}:iteration")


def open_checkpoint(path: Path):
    return dcp_reader(path)


LAYOUT = Layout("megatron", detect, read_step, open_checkpoint, pointer)
