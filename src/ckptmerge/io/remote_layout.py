"""The plain checkpoint formats at a URL, told from one listing (``io/remote_tree.py``) by the local rules of
``io/layout.py``; opening them (safetensors by range reads) and pinning their objects' versions for a merge.

    layout, files = detect_remote_layout(tree, "checkpoint-100")    # ("safetensors", [RemoteObject, ...])
    reader = open_remote_checkpoint(Url("s3", "bucket/run/checkpoint-100"))
    pin = pin_remote_checkpoint(url); ...; pin.verify()             # the same ETags after the merge, or an error
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from ckptmerge.errors import CheckpointFormatError
from ckptmerge.io.layout import SAFETENSORS_INDEX, TORCH_INDEX, TORCH_SUFFIXES
from ckptmerge.io.remote import Url, io_concurrency
from ckptmerge.io.remote_tree import RemoteObject, RemoteTree
from ckptmerge.io.shard_index import MAX_INDEX_BYTES, parse_weight_map

REMOTE_FORMATS = ("safetensors", "dcp", "torch")


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def detect_remote_layout(tree: RemoteTree, rel: str) -> tuple[str, list[RemoteObject]] | None:
    """(layout, weight objects) when ``rel`` in ``tree`` is a checkpoint, else None (rules of ``detect_layout``)."""
    if tree.is_file(rel):
        name = tree.object(rel).url.name  # rel is "" when the URL listed is the file itself
        if name.endswith(".safetensors"):
            return "safetensors", [tree.object(rel)]
        return ("torch", [tree.object(rel)]) if name.endswith(TORCH_SUFFIXES) else None
    if not tree.is_dir(rel):
        return None
    if tree.is_file(_join(rel, SAFETENSORS_INDEX)):
        return "safetensors", _shards(tree, rel, SAFETENSORS_INDEX)
    if tree.is_file(_join(rel, "model.safetensors")):
        return "safetensors", [tree.object(_join(rel, "model.safetensors"))]
    if tree.is_file(_join(rel, TORCH_INDEX)):
        return "torch", _shards(tree, rel, TORCH_INDEX)
    if tree.is_file(_join(rel, "pytorch_model.bin")):
        return "torch", [tree.object(_join(rel, "pytorch_model.bin"))]
    if tree.is_file(_join(rel, ".metadata")):
        return "dcp", [obj for key, obj in tree.under(rel).items() if key.endswith((".metadata", ".distcp"))]
    singles = [name for name in tree.children(rel) if name.endswith(".safetensors") and tree.is_file(_join(rel, name))]
    return ("safetensors", [tree.object(_join(rel, singles[0]))]) if len(singles) == 1 else None


def _shards(tree: RemoteTree, rel: str, index_name: str) -> list[RemoteObject]:
    """The shards an index names: plain names inside its folder, each listed; else CheckpointFormatError."""
    index = tree.object(_join(rel, index_name))
    if index.size > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{index.url}: implausibly large shard index; fix or regenerate the index")
    weight_map = parse_weight_map(index.url, tree.read_bytes(_join(rel, index_name)))
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if n.startswith("/") or "://" in n or posixpath.normpath(n).startswith("..")]
    if outside:
        raise CheckpointFormatError(f"{index.url}: names shard files outside its folder: {outside[:4]}; "
                                    f"an index may only name files inside the checkpoint folder")
    keys = [_join(rel, posixpath.normpath(n)) for n in names]
    missing = [str(tree.url(k)) for k in keys if not tree.is_file(k)]
    if missing:
        raise CheckpointFormatError(f"{index.url}: shard files listed in the index are missing: {missing[:8]}. "
                                    f"Upload the missing shards (incomplete upload?).")
    if not keys:
        raise CheckpointFormatError(f"{index.url}: the index's weight_map is empty; the checkpoint has no tensors.")
    return [tree.object(k) for k in keys]


def located(url: Url) -> tuple[str, list[RemoteObject], RemoteTree]:
    """List ``url`` once and tell its layout; CheckpointFormatError when it is no checkpoint."""
    tree = RemoteTree.list(url)
    if not tree.exists():
        raise CheckpointFormatError(f"{url}: no such object or folder (moved or deleted?); check the URL")
    found = detect_remote_layout(tree, "")
    if found is None:
        raise CheckpointFormatError(f"{url}: not a checkpoint ckptmerge can read. Expected an HF folder "
                                    f"(model.safetensors[.index.json] or pytorch_model.bin[.index.json]), a "
                                    f".safetensors file or a torch file ({', '.join(TORCH_SUFFIXES)}).")
    return found[0], found[1], tree


def open_remote_checkpoint(url: Url):
    """A reader for the checkpoint at ``url`` (safetensors, DCP or torch zip pickles, by range reads); other formats
    are refused in one line."""
    layout, files, tree = located(url)
    if layout == "torch":  # pytorch_model.bin[.index.json], a .pt / .bin file: zip records by range
        from ckptmerge.io.remote_torch import open_remote_torch

        return open_remote_torch(tree, files, display=url)
    if layout not in REMOTE_FORMATS:
        raise CheckpointFormatError(f"{url}: a {layout} checkpoint; from remote storage ckptmerge reads safetensors "
                                    f"and DCP only so far. Copy it to a local folder first (e.g. fsspec's `get`), or "
                                    f"convert it to safetensors.")
    if layout == "dcp":
        from ckptmerge.io.remote_dcp import RemoteDcpReader

        return RemoteDcpReader(tree, url)
    from ckptmerge.io.remote_safetensors import RemoteSafetensorsReader

    return RemoteSafetensorsReader(tree.fs, files, display_path=url, concurrency=io_concurrency())


@dataclass
class PinnedRemoteCheckpoint:
    """A remote checkpoint's weight objects as they were listed before the merge: ``verify`` lists them again."""

    path: Url
    versions: dict[str, str]
    fingerprint: str | None

    def verify(self) -> None:
        """Raise CheckpointFormatError if any object changed, appeared or disappeared since it was pinned."""
        try:
            now = _versions(located(self.path)[1])
        except CheckpointFormatError:
            now = {}
        if now != self.versions:
            changed = sorted(k for k in set(now) | set(self.versions) if now.get(k) != self.versions.get(k))
            raise CheckpointFormatError(f"{self.path}: changed while it was being merged ({', '.join(changed[:4])}: "
                                        f"another ETag than the one planned); nothing was published. Rerun the merge "
                                        f"once the checkpoint is no longer modified.")


def pin_remote_checkpoint(url: Url, mode: str = "sampled") -> PinnedRemoteCheckpoint:
    """The versions (ETags) of ``url``'s weight objects, and a fingerprint over them (``etag-sha256:...``):
    the store's own content tags stand in for a hash of the bytes, which would cost a second read."""
    versions = _versions(located(url)[1])
    digest = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(versions.items())).encode())
    return PinnedRemoteCheckpoint(url, versions, None if mode == "none" else f"etag-sha256:{digest.hexdigest()}")


def _versions(files: list[RemoteObject]) -> dict[str, str]:
    return {str(obj.url): f"{obj.size}:{obj.version}" for obj in files}
