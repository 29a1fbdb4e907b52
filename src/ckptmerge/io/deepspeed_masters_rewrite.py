"""Write merged weights into every rank's fp32 master partitions of a DeepSpeed ZeRO tag folder.

DeepSpeed resumes (``load_from_fp32_weights: true``, its default) from the fp32 masters in each rank's
``*_optim_states.pt``, not from the module weights, so a hand-back of a merge must put the merge there
too. Each rank's flat vectors are copied with every parameter's elements replaced by the merged ones,
cut exactly as io/deepspeed_zero.py reads them (ZeRO 1/2: the group's vector split over the ranks;
ZeRO 3: every parameter split over the ranks); padding keeps the bytes DeepSpeed wrote. Everything else
in the files (Adam's moments, step counts, loss scaler) is copied unchanged, record by record
(io/torch_file_rewrite.py): the pickle is never written again.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.deepspeed_zero import GROUP_KEYS, Span, ZeroMastersReader, optim_files
from ckptmerge.io.torch_file_rewrite import load_tensor_refs, rewrite_tensors
from ckptmerge.io.torch_reader import load_torch_payload

# (start in the vector, element count, the parameter's name, the parameter's flat offset) per vector key
Pieces = dict[int, list[tuple[int, int, str, int]]]


def rewrite_masters(src: Path, dst: Path, model_states: Path, merged: dict[str, torch.Tensor]) -> None:
    """Copy each ``*_optim_states.pt`` of tag folder ``src`` into folder ``dst`` with the masters set to ``merged``."""
    reader = ZeroMastersReader(src, model_states)
    try:
        stage, placements, spans = reader.stage, reader.placements(), reader.stored_spans()
        aliases = reader.aliases()
    finally:
        reader.close()
    merged = {**{a: merged[s] for a, s in aliases.items() if s in merged}, **merged}  # tied names share a master
    _check_merged(src, placements, merged)
    by_vector = _pieces_by_vector(placements)
    for rank, file in enumerate(optim_files(src)):
        key = GROUP_KEYS[stage]
        refs = load_tensor_refs(file)["optimizer_state_dict"][key]
        stored = load_torch_payload(file)["optimizer_state_dict"][key]
        values = {ref: _filled(old, span, by_vector, merged) for ref, old, span in zip(refs, stored, spans[rank])}
        rewrite_tensors(file, dst / file.name, values)


def _check_merged(src: Path, placements: dict, merged: dict[str, torch.Tensor]) -> None:
    """Every master has a merged tensor of its size, in fp32 (a half-precision merge would lose the masters' bits)."""
    missing = sorted(set(placements) - set(merged))
    if missing:
        raise CheckpointFormatError(f"{src}: the merge has no tensor for the fp32 masters {missing[:8]}; "
                                    f"merge checkpoints of the same model")
    wrong = [n for n, p in placements.items() if merged[n].numel() != math.prod(p.shape)]
    if wrong:
        raise CheckpointFormatError(f"{src}: merged tensors {wrong[:8]} do not have the masters' sizes")
    half = [n for n in placements if merged[n].dtype != torch.float32]
    if half:
        raise CheckpointFormatError(f"{src}: the merge of {half[:4]} is {merged[half[0]].dtype}, but DeepSpeed's fp32 "
                                    f"masters need the fp32 merge; drop --out-dtype with --as-checkpoint")


def _pieces_by_vector(placements: dict) -> Pieces:
    """Each parameter's real elements (padding left out) in each vector, indexed by the vector's key."""
    out: Pieces = {}
    for name, placement in placements.items():
        numel, flat_offset = math.prod(placement.shape), 0
        for span in placement.spans:
            count = max(0, min(span.length, numel - flat_offset))
            if count:
                out.setdefault(span.key, []).append((span.start, count, name, flat_offset))
            flat_offset += span.length
    return out


def _filled(old: torch.Tensor, where: Span, by_vector: Pieces, merged: dict[str, torch.Tensor]) -> torch.Tensor:
    """A copy of one stored flat tensor (at ``where`` in its vector) with the merged elements written in."""
    new = old.clone()
    end = where.start + where.length
    for start, count, name, flat_offset in by_vector.get(where.key, []):
        lo, hi = max(start, where.start), min(start + count, end)
        if lo < hi:
            source = merged[name].reshape(-1)[flat_offset + lo - start:flat_offset + hi - start]
            new[lo - where.start:hi - where.start] = source.to(new.dtype)
    return new
