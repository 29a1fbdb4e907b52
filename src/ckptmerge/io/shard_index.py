"""Read an HF shard index (``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``) safely.

The index is untrusted: it must be a UTF-8 JSON object without repeated keys whose
``weight_map`` maps tensor names (strings) to shard file names (strings), and every shard must be
a file inside the index's folder after resolving symlinks (``io/confine.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.confine import confined_path
from ckptmerge.io.safetensors_header import reject_duplicate_keys

MAX_INDEX_BYTES = 64 * 1024 * 1024


def read_shard_index(index_path: Path) -> list[Path]:
    """The shard files an index names, sorted and de-duplicated; raises CheckpointFormatError."""
    weight_map = _weight_map(index_path)
    folder = index_path.parent
    files = [confined_path(folder, name, named_by=index_path) for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointFormatError(f"{index_path}: shard files listed in the index are missing: {missing[:8]}. "
                                    f"Copy the missing shards into the folder (incomplete download?).")
    if not files:
        raise CheckpointFormatError(f"{index_path}: the index's weight_map is empty; the checkpoint has no tensors.")
    return files


_FIX = "Fix or regenerate the index (it needs {\"weight_map\": {tensor name: shard file name}})."


def _weight_map(index_path: Path) -> dict[str, str]:
    if index_path.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{index_path}: implausibly large shard index; {_FIX}")
    return parse_weight_map(index_path, index_path.read_bytes())


def parse_weight_map(index_path: object, raw: bytes) -> dict[str, str]:
    """The validated ``weight_map`` of an index's bytes (``index_path`` names it in errors: a path or a URL)."""
    fix = _FIX
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, repeated keys
        raise CheckpointFormatError(f"{index_path}: not a valid shard index ({str(exc)[:200]}). {fix}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointFormatError(f"{index_path}: not a valid shard index (no 'weight_map' object). {fix}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointFormatError(f"{index_path}: weight_map entries must map strings to strings. {fix}")
    return weight_map
