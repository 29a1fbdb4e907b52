"""Validate a merge across all inputs before any tensor is read or any byte is written.

``build_plan`` compares key sets, shapes, dtypes and tied tensors of every checkpoint against
the newest one and raises a single PlanMismatchError that lists every problem found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ckptmerge.errors import PlanMismatchError
from ckptmerge.io.tensor_info import CheckpointReader, TensorInfo
from ckptmerge.io.wrapper_names import wrapped_names
from ckptmerge.merging.checkpoint import CheckpointRef

MAX_LISTED = 10


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: merged from float inputs, or copied from the newest checkpoint."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merged: bool

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.out_dtype, self.shape)


@dataclass
class MergePlan:
    """What a merge will do: inputs, coefficients, and the output tensors in write order."""

    refs: list[CheckpointRef]
    coeffs: list[float]
    tasks: list[TensorTask]
    aliases: dict[str, str]
    accum_dtype: torch.dtype

    @property
    def active(self) -> list[int]:
        """Indices of inputs with a non-zero coefficient (the only ones read for merged tensors)."""
        return [i for i, c in enumerate(self.coeffs) if c != 0.0]

    @property
    def newest(self) -> int:
        return len(self.refs) - 1


def build_plan(readers: Sequence[CheckpointReader], refs: Sequence[CheckpointRef], coeffs: Sequence[float], *,
               out_dtype: torch.dtype | None = None, accum_dtype: torch.dtype = torch.float32) -> MergePlan:
    """Check that all checkpoints agree and return the merge plan.

    Raises:
        PlanMismatchError: listing every differing key, shape, dtype and tie, with the checkpoints involved.
    """
    if len(readers) != len(coeffs) or len(readers) != len(refs):
        raise ValueError("readers, refs and coeffs must have the same length")
    newest = readers[-1]
    problems = _key_problems(readers) + _alias_problems(readers)
    tasks = []
    for name in newest.keys():
        infos = [r.info(name) for r in readers if name in r.keys()]
        problem = _tensor_problem(name, infos, readers, out_dtype)
        if problem:
            problems.append(problem)
            continue
        info = newest.info(name)
        merged = info.is_float
        tasks.append(TensorTask(name, info.shape, (out_dtype or info.dtype) if merged else info.dtype, merged))
    problems += _coverage_problems(tasks, readers) + _wrapper_problems(newest)
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise PlanMismatchError("checkpoints do not match; nothing was written:\n  " + "\n  ".join(shown))
    return MergePlan(list(refs), list(coeffs), tasks, newest.aliases(), accum_dtype)


def _coverage_problems(tasks: list[TensorTask], readers: Sequence[CheckpointReader]) -> list[str]:
    """A merge whose float tensors are all scalars lost the weights (a step counter or loss taken for the model)."""
    merged = [t for t in tasks if t.merged]
    if tasks and not any(len(t.shape) > 0 for t in merged):
        names = [t.name for t in tasks][:MAX_LISTED]
        return [f"{readers[-1].path}: the entries found hold no weight matrix or vector, only {names}; "
                f"these are counters or losses, not a model. Save the model's state_dict, or name where it is "
                f"(a file with 'model' / 'state_dict' / 'module' holding it)."]
    return []


def _wrapper_problems(newest: CheckpointReader) -> list[str]:
    """Names still under a wrapper (``state_dict.``, ``_fsdp_wrapped_module.``) would load into no model."""
    wrapped = wrapped_names(newest.keys())
    if not wrapped:
        return []
    return [f"{newest.path}: {len(wrapped)} tensor name(s) still carry a wrapper prefix, e.g. {wrapped[:4]}; these are "
            f"not the model's own names, so no model would load the merge. Fix: save the unwrapped model's "
            f"state_dict, or report this layout to ckptmerge."]


def _key_problems(readers: Sequence[CheckpointReader]) -> list[str]:
    reference = set(readers[-1].keys())
    problems = []
    for reader in readers[:-1]:
        keys = set(reader.keys())
        missing, extra = sorted(reference - keys), sorted(keys - reference)
        if missing:
            problems.append(f"{reader.path}: lacks {len(missing)} tensor(s) the newest checkpoint "
                            f"{readers[-1].path} has: {missing[:MAX_LISTED]}")
        if extra:
            problems.append(f"{reader.path}: has {len(extra)} tensor(s) the newest checkpoint lacks: {extra[:MAX_LISTED]}")
    return problems


def _alias_problems(readers: Sequence[CheckpointReader]) -> list[str]:
    reference = readers[-1].aliases()
    return [f"{r.path}: tied tensors {r.aliases()} differ from the newest checkpoint's {reference}"
            for r in readers[:-1] if r.aliases() != reference]


def _tensor_problem(name: str, infos: list[TensorInfo], readers: Sequence[CheckpointReader],
                    out_dtype: torch.dtype | None) -> str | None:
    if len({i.shape for i in infos}) > 1:
        return f"tensor {name!r}: shapes differ: {_by_reader(name, readers, lambda i: i.shape)}"
    if len({i.is_float for i in infos}) > 1:
        return f"tensor {name!r}: float in some checkpoints, not in others: {_by_reader(name, readers, lambda i: i.dtype)}"
    if len({i.dtype for i in infos}) > 1 and (out_dtype is None or not infos[0].is_float):
        return (f"tensor {name!r}: dtypes differ: {_by_reader(name, readers, lambda i: i.dtype)}; "
                f"pass --out-dtype float32|bfloat16|float16 to choose the output dtype")
    return None


def _by_reader(name: str, readers: Sequence[CheckpointReader], field) -> str:
    return ", ".join(f"{r.path.name}={field(r.info(name))}" for r in readers if name in r.keys())
