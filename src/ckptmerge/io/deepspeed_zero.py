"""DeepSpeed ZeRO checkpoints: the full fp32 weights, assembled from every rank's fp32 master partitions.

A ZeRO tag folder holds one ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank.
Its ``optimizer_state_dict`` keeps that rank's share of the fp32 masters as flat vectors, one per
parameter group: ``fp32_flat_groups`` (ZeRO 3) or ``single_partition_of_fp32_groups`` (ZeRO 1/2).
The names and shapes come from the model-states file's ``param_shapes`` (one ordered dict per group).

- ZeRO 1/2: a group's full vector is the ranks' partitions end to end; its parameters follow each
  other in it, each followed by its ``param_alignment_paddings`` entry when the file records them.
- ZeRO 3: every parameter is split over all ranks: each rank holds ``ceil(numel / world)`` elements of
  it, at the same offset of its own flat vector (its groups end to end); the last rank's share is padded.

This is the layout DeepSpeed's own ``zero_to_fp32`` reads. Files are memory-mapped and ``get`` copies
one parameter's slices, so memory holds one tensor, never a rank's whole optimizer state.
Buffers are rank 0's module entries named in ``buffer_names`` (floats as fp32, as ``zero_to_fp32``
gives them); ``shared_params`` are tied names; ZeRO 3 frozen parameters come from every rank's
``frozen_param_fragments``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.state_dict_reader import StateDictReader
from ckptmerge.io.tensor_info import TensorInfo
from ckptmerge.io.torch_reader import load_torch_payload
from ckptmerge.io.wrapper_names import unwrap_name, unwrap_names

OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
GROUP_KEYS = {3: "fp32_flat_groups", 2: "single_partition_of_fp32_groups"}


@dataclass(frozen=True)
class Span:
    """``length`` elements from ``start`` of one flat vector: rank ``key``'s (ZeRO 3) or group ``key``'s (ZeRO 1/2)."""

    key: int
    start: int
    length: int


@dataclass(frozen=True)
class Placement:
    """Where one parameter's fp32 masters lie: its spans, read in order, then cut to ``shape``."""

    shape: tuple[int, ...]
    spans: tuple[Span, ...]


def optim_files(folder: Path) -> list[Path]:
    """The per-rank optimizer files of a ZeRO tag folder, in rank order; refuses gaps."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := OPTIM_FILE.match(p.name))}
    if sorted(found) != list(range(len(found))):
        raise CheckpointFormatError(f"{folder}: ZeRO optimizer files for ranks {sorted(found)}; expected ranks "
                                    f"0..{len(found) - 1}. A rank's file is missing: copy the whole tag folder.")
    return [found[rank] for rank in range(len(found))]


def model_states_files(folder: Path, world: int) -> list[Path]:
    """The ZeRO 3 per-rank model-states files (shapes, buffers, frozen fragments), in rank order."""
    files = [folder / ZERO3_MODEL_FILE.format(rank=r) for r in range(world)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointFormatError(f"{folder}: ZeRO 3 model-states files {missing} missing for a {world}-rank run")
    return files


def _rank_groups(path: Path, state: object, world: int) -> tuple[int, list[torch.Tensor], list | None]:
    """(stage 2 or 3, this rank's fp32 flat groups, alignment paddings) from one optimizer file's ``state``."""
    osd = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    if not isinstance(osd, dict):
        raise CheckpointFormatError(f"{path}: no 'optimizer_state_dict'; not a DeepSpeed ZeRO optimizer file")
    stage = next((s for s, key in GROUP_KEYS.items() if key in osd), None)
    groups = osd.get(GROUP_KEYS.get(stage, ""))
    if stage is None or not isinstance(groups, list) or not all(_is_flat(g) for g in groups):
        raise CheckpointFormatError(f"{path}: no fp32 master partitions ({' / '.join(GROUP_KEYS.values())}) "
                                    f"as flat float tensors; not a ZeRO checkpoint ckptmerge can read")
    count = osd.get("partition_count")
    count = max(count) if isinstance(count, list) and count else count
    if count != world:
        raise CheckpointFormatError(f"{path}: written by {count} ranks, but the folder holds {world} optimizer "
                                    f"files; a rank's file is missing or left from an older run")
    return stage, list(groups), osd.get("param_alignment_paddings")


def _is_flat(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype.is_floating_point


def _shapes(path: Path, state: dict) -> list[dict[str, tuple[int, ...]]]:
    groups = state.get("param_shapes")
    ok = isinstance(groups, list) and all(isinstance(g, dict) and all(
        isinstance(k, str) and isinstance(s, (tuple, list)) and all(isinstance(d, int) and d >= 0 for d in s)
        for k, s in g.items()) for g in groups)
    if not ok:
        raise CheckpointFormatError(f"{path}: 'param_shapes' is not a list of {{name: shape}} dicts; "
                                    f"not a DeepSpeed model-states file ckptmerge can read")
    return [{name: tuple(shape) for name, shape in g.items()} for g in groups]


def zero3_placements(shapes: list[dict], world: int) -> dict[str, Placement]:
    """ZeRO 3: each parameter's ``ceil(numel / world)`` elements at one offset of every rank's flat vector."""
    out, offset = {}, 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        share = math.ceil(math.prod(shape) / world)
        out[name] = Placement(shape, tuple(Span(rank, offset, share) for rank in range(world)))
        offset += share
    return out


def zero12_placements(shapes: list[dict], paddings: list | None) -> dict[str, Placement]:
    """ZeRO 1/2: parameters one after another in their group's full vector (ranks' partitions end to end)."""
    out = {}
    for g, group in enumerate(shapes):
        offset = 0
        pads = paddings[g] if isinstance(paddings, list) and g < len(paddings) else None
        for i, (name, shape) in enumerate(group.items()):
            out[name] = Placement(shape, (Span(g, offset, math.prod(shape)),))
            offset += math.prod(shape) + (pads[i] if isinstance(pads, list) and i < len(pads) else 0)
    return out


def read_span(pieces: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements ``[start, start + length)`` of the vector that ``pieces`` form end to end."""
    parts, base = [], 0
    for piece in pieces:
        lo, hi = max(start, base), min(start + length, base + piece.numel())
        if lo < hi:
            parts.append(piece[lo - base:hi - base])
        base += piece.numel()
    return torch.cat(parts) if parts else torch.empty(0, dtype=pieces[0].dtype if pieces else torch.float32)


class ZeroMastersReader:
    """The fp32 masters of a ZeRO tag folder (any stage), one parameter at a time, plus buffers."""

    layout = "torch"

    def __init__(self, folder: Path, model_states: Path, *, display_path: Path | None = None):
        self.path = display_path or folder
        files = optim_files(folder)
        if not files:
            raise CheckpointFormatError(f"{folder}: no '*zero_pp_rank_*_optim_states.pt' files, so no fp32 "
                                        f"masters; this is not a ZeRO checkpoint (ZeRO 0 keeps the weights in {model_states.name})")
        ranks = [_rank_groups(f, self._load(f), len(files)) for f in files]
        self.stage, world = ranks[0][0], len(files)
        state = self._load(model_states)
        shapes = _shapes(model_states, state)
        if self.stage == 3:
            self._flats = [groups for _, groups, _ in ranks]
            placements = zero3_placements(shapes, world)
        else:
            self._flats = [[groups[g] for _, groups, _ in ranks] for g in range(len(ranks[0][1]))]
            placements = zero12_placements(shapes, ranks[0][2])
        self._check_sizes(folder, placements, world)
        self._names = unwrap_names(folder, placements)
        self._placements = placements
        extras = _buffers_and_frozen(folder, state, self.stage, world, self._load, self._value)
        self._extras = StateDictReader(extras, folder, layout="torch")
        self._aliases = _shared(state, placements, extras)
        self._cached: tuple[str, torch.Tensor] | None = None

    # How a file's object and its tensors' data are had: memory-mapped here; by byte ranges at a URL
    # (io/remote_zero.py overrides these three).
    def _load(self, path: Path) -> object:
        return load_torch_payload(path)

    def _value(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _read_span(self, key: int, start: int, length: int) -> torch.Tensor:
        return read_span(self._flats[key], start, length)

    def _check_sizes(self, folder: Path, placements: dict[str, Placement], world: int) -> None:
        """Every span inside its flat vector, and (ZeRO 3) the vectors used up, as ``zero_to_fp32`` checks."""
        sizes = [sum(p.numel() for p in pieces) for pieces in self._flats]
        spans = [s for p in placements.values() for s in p.spans]
        fits = all(s.start + s.length <= sizes[s.key] for s in spans)
        if self.stage == 3:
            fits = fits and len(set(sizes)) == 1 and max((s.start + s.length for s in spans), default=0) == sizes[0]
        if not fits:
            raise CheckpointFormatError(f"{folder}: the {len(placements)} parameter shapes in the model states do not "
                                        f"fit the fp32 partitions ({sizes} elements per "
                                        f"{'rank' if self.stage == 3 else 'group'}, {world} rank(s)); the files are "
                                        f"from different runs or corrupt")

    def keys(self) -> list[str]:
        return [n for n in self._names if n not in self._aliases] + self._extras.keys()

    def info(self, name: str) -> TensorInfo:
        if name in self._names:
            return TensorInfo(torch.float32, self._placements[self._names[name]].shape)
        return self._extras.info(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._names:
            return self._extras.get(name)
        if self._cached is None or self._cached[0] != name:
            self._cached = None
            self._cached = (name, self._assemble(self._placements[self._names[name]]))
        return self._cached[1]

    def _assemble(self, placement: Placement) -> torch.Tensor:
        parts = [self._read_span(s.key, s.start, s.length) for s in placement.spans]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        return flat[:math.prod(placement.shape)].float().reshape(placement.shape).clone()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.get(name)
        return t if t.dim() == 0 else t[start:stop]

    def file_range(self, name: str, start: int, stop: int) -> None:
        return None

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def metadata(self) -> dict[str, str]:
        return {"framework": "deepspeed", "weights": f"fp32 masters (ZeRO {self.stage})"}

    def close(self) -> None:
        self._cached, self._flats = None, []

    def placements(self) -> dict[str, Placement]:
        """Each (unwrapped) parameter name's place in the partitions: used to write merged masters back."""
        return {name: self._placements[stored] for name, stored in self._names.items()}

    def stored_spans(self) -> list[list[Span]]:
        """For each rank, where each flat tensor of its optimizer file lies in the vectors that spans index:
        ZeRO 3, the rank's own vector (its groups end to end); ZeRO 1/2, its group's (ranks end to end)."""
        if self.stage == 3:
            return [[Span(rank, sum(p.numel() for p in groups[:g]), groups[g].numel()) for g in range(len(groups))]
                    for rank, groups in enumerate(self._flats)]
        return [[Span(g, sum(p.numel() for p in pieces[:rank]), pieces[rank].numel())
                 for g, pieces in enumerate(self._flats)] for rank in range(len(self._flats[0]))]


def _buffers_and_frozen(folder: Path, state: dict, stage: int, world: int, load=load_torch_payload,
                        value=lambda t: t) -> dict[str, torch.Tensor]:
    """Buffers and frozen parameters, their data had by ``value(tensor)`` from the objects ``load(path)`` gives."""
    module = state.get("module") if isinstance(state.get("module"), dict) else {}
    names = state.get("buffer_names") if isinstance(state.get("buffer_names"), list) else []
    out = {k: (value(t).float() if t.dtype.is_floating_point else value(t)) for k, t in module.items()
           if k in names and isinstance(t, torch.Tensor)}
    frozen = state.get("frozen_param_shapes") or {}
    if frozen and stage == 3:
        fragments = [load(f).get("frozen_param_fragments", {}) for f in model_states_files(folder, world)]
        for name, shape in frozen.items():
            whole = torch.cat([value(f[name]).reshape(-1) for f in fragments])
            out[name] = whole[:math.prod(shape)].float().reshape(tuple(shape))
    elif frozen:
        out.update({name: value(t).float() for name, t in (state.get("frozen_param_fragments") or {}).items()})
    return {clean: out[name] for clean, name in unwrap_names(folder, out).items()}


def _shared(state: dict, placements: dict, extras: dict) -> dict[str, str]:
    """Tied names (``shared_params``: alias -> source) whose source is read here, unwrapped."""
    shared = state.get("shared_params") if isinstance(state.get("shared_params"), dict) else {}
    return {unwrap_name(alias): unwrap_name(source) for alias, source in shared.items()
            if isinstance(alias, str) and (source in placements or source in extras)}
