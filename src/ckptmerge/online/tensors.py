"""Name-keyed views of a live model's tensors for averaging: float parameters and buffers, others.

Tensors are paired by name, never by position. ``named_parameters`` yields a tied weight once,
so tied weights are averaged once. DTensor parameters (FSDP2) are replaced by their local shard:
each rank averages its own shards, with no communication.
"""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def float_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Float parameters and float buffers (live tensors, not copies)."""
    out = {name: _local(p.detach()) for name, p in model.named_parameters()}
    out.update({name: _local(b.detach()) for name, b in model.named_buffers() if b.is_floating_point()})
    return out


def other_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-float buffers (counters, masks, position ids): copied, never averaged."""
    return {name: _local(b.detach()) for name, b in model.named_buffers() if not b.is_floating_point()}
