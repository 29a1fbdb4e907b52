"""Parse and validate a safetensors header as strictly as the safetensors library does.

A header is untrusted input: every entry must be an object with a known ``dtype`` string, a
``shape`` list of non-negative integers and a ``data_offsets`` pair of integers; the byte ranges
must match shape x dtype, lie inside the data section, and never overlap; keys are unique;
``__metadata__`` is an object of strings. Anything else raises ``CheckpointFormatError`` naming
the file, the tensor and the fix, before a byte of tensor data is read.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ckptmerge.errors import CheckpointFormatError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (torch's name for it, bytes per element). Torch is imported only to build a reader's
# entries (``checked_entries``): reading a header (``inspect``) needs none.
DTYPE_NAMES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
_FIX = "the file is corrupt or was not written by a safetensors library; re-export it with safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype."""
    import torch

    return {name: getattr(torch, torch_name) for name, (torch_name, _) in DTYPE_NAMES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, absolute offset of the data section) of a safetensors file.

    Only the JSON syntax is checked here; ``checked_entries`` / ``checked_metadata`` validate the content.
    """
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointFormatError(f"{path}: too short to be a safetensors file (truncated write?)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES:
            raise CheckpointFormatError(f"{path}: header length {header_len} is implausible; not safetensors")
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise CheckpointFormatError(f"{path}: header is cut short ({len(raw)} of {header_len} bytes); truncated copy?")
    return parse_header(path, raw), 8 + header_len


def header_length(path: object, first8: bytes, file_bytes: int) -> int:
    """The header length that a file's first 8 bytes declare, checked against the file's size (``path``, a path
    or a URL, names the file in errors); for readers that fetch the header themselves (``io/remote_safetensors.py``)."""
    if len(first8) < 8 or file_bytes < 8:
        raise CheckpointFormatError(f"{path}: too short to be a safetensors file (truncated write?)")
    (length,) = struct.unpack("<Q", first8[:8])
    if length > _MAX_HEADER_BYTES:
        raise CheckpointFormatError(f"{path}: header length {length} is implausible; not safetensors")
    if 8 + length > file_bytes:
        raise CheckpointFormatError(f"{path}: header is cut short ({file_bytes - 8} of {length} bytes); truncated copy?")
    return length


def stored_dtypes(path: Path) -> dict[str, str]:
    """``tensor name -> torch dtype name`` (``float32``, ``bfloat16``, ...) of a safetensors file, from its header
    alone (validated as a reader would validate it); no torch."""
    header, data_start = read_header(path)
    entries = _checked_specs(path, header, Path(path).stat().st_size - data_start)
    return {name: DTYPE_NAMES[dtype_name][0] for name, (dtype_name, _, _) in entries.items()}


def reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json`` ``object_pairs_hook`` that refuses an object with a repeated key."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:200]!r}")
        out[key] = value
    return out


def parse_header(path: Path, raw: bytes) -> dict:
    """The header's JSON object; duplicate keys, bad UTF-8 and non-objects are errors."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointFormatError(f"{path}: safetensors header is not valid JSON ({str(exc)[:200]}); {_FIX}") from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object; {_FIX}")
    return header


def checked_metadata(path: Path, header: dict) -> dict[str, str]:
    """``__metadata__`` as a dict of strings (empty when absent)."""
    meta = header.get("__metadata__")
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointFormatError(f"{path}: safetensors __metadata__ must be an object of strings, "
                                    f"got {type(meta).__name__}; {_FIX}")
    return dict(meta)


def checked_entries(path: Path, header: dict, data_bytes: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """``name -> (dtype, shape, begin)`` for every tensor, with begin relative to the data section.

    Raises CheckpointFormatError on a malformed entry, a range that does not match the shape, runs
    outside the data section (``data_bytes`` long) or overlaps another tensor's bytes.
    """
    dtypes = torch_dtypes()
    return {name: (dtypes[dtype_name], shape, begin)
            for name, (dtype_name, shape, begin) in _checked_specs(path, header, data_bytes).items()}


def _checked_specs(path: Path, header: dict, data_bytes: int) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """``checked_entries`` with the safetensors dtype names (``F32``) in place of torch dtypes."""
    entries = {}
    ranges = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype_name, shape, begin, end = _checked_entry(path, name, spec)
        nbytes = math.prod(shape) * DTYPE_NAMES[dtype_name][1]
        if end - begin != nbytes:
            raise CheckpointFormatError(f"{path}: tensor {name[:200]!r} byte range [{begin}, {end}) holds {end - begin} "
                                        f"bytes but shape {list(shape)} needs {nbytes}; {_FIX}")
        if end > data_bytes:
            raise CheckpointFormatError(f"{path}: tensor {name[:200]!r} byte range [{begin}, {end}) runs past the end of "
                                        f"the data section ({data_bytes} bytes); the file is truncated (incomplete copy?)")
        entries[name] = (dtype_name, shape, begin)
        ranges.append((begin, end, name))
    _check_no_overlap(path, ranges)
    return entries


def _checked_entry(path: Path, name: str, spec: object) -> tuple[str, tuple[int, ...], int, int]:
    where = f"{path}: tensor {name[:200]!r}"
    if not isinstance(spec, dict):
        raise CheckpointFormatError(f"{where}: header entry is a JSON {type(spec).__name__}, not an object; {_FIX}")
    dtype_name = spec.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPE_NAMES:
        shown = dtype_name if isinstance(dtype_name, str) else type(dtype_name).__name__
        raise CheckpointFormatError(f"{where}: unsupported dtype {str(shown)[:40]!r} (known: {', '.join(DTYPE_NAMES)}); {_FIX}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointFormatError(f"{where}: shape must be a list of non-negative integers; {_FIX}")
    offsets = spec.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointFormatError(f"{where}: data_offsets must be two non-negative integers [begin, end]; {_FIX}")
    begin, end = offsets
    if end < begin:
        raise CheckpointFormatError(f"{where}: data_offsets [{begin}, {end}) end before they begin; {_FIX}")
    return dtype_name, tuple(shape), begin, end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, ranges: list[tuple[int, int, str]]) -> None:
    previous_end, previous_name = 0, ""
    for begin, end, name in sorted(r for r in ranges if r[1] > r[0]):  # empty tensors read no bytes
        if begin < previous_end:
            raise CheckpointFormatError(f"{path}: tensors {previous_name[:200]!r} and {name[:200]!r} share bytes "
                                        f"(ranges overlap at offset {begin}); {_FIX}")
        previous_end, previous_name = end, name
