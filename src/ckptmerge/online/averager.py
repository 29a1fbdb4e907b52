"""The Averager surface shared by every online rule (EMA, SWA, LAWA, PMA).

    avg = EMA(half_life=500)
    for step in range(1, steps + 1):
        ...; optimizer.step()
        avg.update(model, step)                  # after the optimizer step; repeated calls per step are ignored
        with avg.swapped(model):                 # averaged weights in, training weights back after
            evaluate(model)
        metrics = avg.evaluate(model, step, evaluation)  # PeriodicEval: averaged vs training weights, when due
    avg.save("runs/a/avg-ema", model)            # an HF folder that `ckptmerge eval` / `merge` read
    torch.save(avg.state_dict(), "avg.pt")       # resume: avg.load_state_dict(torch.load(..., weights_only=True))

Averages are kept in fp32 (whatever the model dtype), on the model's device or, with
``offload=True``, on the CPU (pinned staging and non-blocking copies from a GPU).

Under DDP every rank keeps the same whole average; under FSDP2 each rank averages its own shards
(``online/sharding.py``). ``save`` is then a collective (``online/saving.py``), and the state of a sharded
average belongs to one rank of one world size (``online/state_files.py`` names a file per rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ckptmerge.online.saving import save_averaged
from ckptmerge.online.sharding import (
    check_same_processes,
    check_same_shards,
    shard_layout,
)
from ckptmerge.online.tensors import float_tensors, other_buffers

if TYPE_CHECKING:
    from ckptmerge.online.periodic_eval import PeriodicEval

_RENAMED_PARAMS = {"half_life_steps": "half_life", "k": "n"}  # saved parameter names of earlier releases


class Averager:
    """Base class: bookkeeping, swapping, saving and state; subclasses define ``_fold`` and ``_averaged``."""

    kind = "averager"

    def __init__(self, *, every: int = 1, offload: bool = False):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every
        self.offload = offload
        self.n_averaged = 0
        self.last_step: int | None = None
        self.last_tokens: int | None = None
        self._other: dict[str, torch.Tensor] = {}
        self._layout: dict | None = None  # where the averaged tensors live (online/sharding.py)
        self._layout_checked = True

    # --- the rule -----------------------------------------------------------------------------
    def params(self) -> dict:
        """The rule's parameters (recorded in saved metadata)."""
        return {"every": self.every}

    def should_update(self, step: int) -> bool:
        return step % self.every == 0

    def _fold(self, current: dict[str, torch.Tensor], step: int, tokens_seen: int | None) -> None:
        raise NotImplementedError

    def _averaged(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- the surface ----------------------------------------------------------------------------
    def update(self, model: torch.nn.Module, step: int, tokens_seen: int | None = None) -> bool:
        """Fold the model's current weights in, if ``step`` is new and due; returns whether it did."""
        if step == self.last_step or not self.should_update(step):
            return False
        self._check_layout(model)
        with torch.no_grad():
            self._fold(self._stage(float_tensors(model)), step, tokens_seen)
            self._other = {k: v.clone() for k, v in other_buffers(model).items()}
        self.n_averaged += 1
        self.last_step, self.last_tokens = step, tokens_seen
        return True

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """Averaged float tensors (fp32) plus the newest non-float buffers, keyed by name."""
        if self.n_averaged == 0:
            raise RuntimeError(f"{self.kind}: no update yet; call update(model, step) after an optimizer step")
        return {**self._averaged(), **self._other}

    @contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Put the averaged weights into ``model`` for the block; restore the training weights after."""
        self._check_layout(model)
        live = float_tensors(model)
        averaged = self.averaged_state_dict()
        backup = {k: v.clone() for k, v in live.items()}
        with torch.no_grad():
            for name, tensor in live.items():
                tensor.copy_(averaged[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in live.items():
                    tensor.copy_(backup[name])

    def evaluate(self, model: torch.nn.Module, step: int, evaluation: PeriodicEval, *,
                 label: str | None = None) -> dict[str, float]:
        """When ``step`` is due for ``evaluation`` (``online/periodic_eval.py``) and the average has an update: the
        loss of the training weights and of this average (swapped in, then out) on the same held-out windows,
        under watch's metric names (``eval/merged/<label or kind>/...``); ``{}`` otherwise."""
        if self.n_averaged == 0 or not evaluation.is_due(step):
            return {}
        return evaluation.evaluate(model, {label or self.kind: self})

    @property
    def is_sharded(self) -> bool:
        """Whether this process averages FSDP2 shards (its state then belongs to this rank alone)."""
        return bool(self._layout and self._layout["sharded"])

    def save(self, path: str | Path, model: torch.nn.Module, *, format: str = "hf", extra_meta: dict | None = None) -> Path:
        """Write the averaged model as one checkpoint, atomically: ``format="hf"`` an HF folder (model.safetensors
        for plain modules; FSDP2 shards gathered on rank 0), ``"dcp"`` a torch.distributed.checkpoint folder
        written by every rank. Under torch.distributed every rank must call it; rank 0 publishes."""
        meta = {"step": self.last_step, "tokens_seen": self.last_tokens, "merged": True,
                "averaged": {"kind": self.kind, **self.params(), "n_averaged": self.n_averaged}, **(extra_meta or {})}
        return save_averaged(self, Path(path), model, format=format, meta=meta)

    def state_dict(self) -> dict:
        """Everything needed to continue the same average after a restart (tensors and plain values)."""
        return {"kind": self.kind, "params": self.params(), "n_averaged": self.n_averaged,
                "last_step": self.last_step, "last_tokens": self.last_tokens, "other": dict(self._other),
                "layout": self._layout, **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        saved = {_RENAMED_PARAMS.get(k, k): v for k, v in state["params"].items()}  # states of earlier releases
        if state["kind"] != self.kind or saved != self.params():
            raise ValueError(f"state is for {state['kind']} {state['params']}, not {self.kind} {self.params()}")
        check_same_processes(state.get("layout"), f"{self.kind} averager state")  # before changing anything
        self.n_averaged, self.last_step, self.last_tokens = state["n_averaged"], state["last_step"], state["last_tokens"]
        self._other = dict(state["other"])
        self._layout, self._layout_checked = state.get("layout"), False
        self._load_extra_state(state)

    def _extra_state(self) -> dict:
        return {}

    def _check_layout(self, model: torch.nn.Module) -> None:
        """Record where the average lives at the first update; after a resume, check the model still fits it."""
        if self._layout is None:
            self._layout = shard_layout(model)
        elif not self._layout_checked:
            check_same_shards(self._layout, model, f"{self.kind} averager state")
            self._layout_checked = True

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _stage(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Live tensors as the rule will read them: on CPU when offloading (non-blocking from a GPU)."""
        if not self.offload or not any(v.is_cuda for v in live.values()):
            return live
        if not hasattr(self, "_pinned"):
            self._pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in live.items()}
        for name, tensor in live.items():
            self._pinned[name].copy_(tensor, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return self._pinned
