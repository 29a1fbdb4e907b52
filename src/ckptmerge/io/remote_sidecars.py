"""The small files beside a remote checkpoint (config, tokenizer, generation config), brought to a local folder.

    local = mirror_sidecars(Url("s3", "bucket/run/checkpoint-100"), Path("/tmp/x"))
    # /tmp/x/run/checkpoint-100/config.json, /tmp/x/run/tokenizer.json, ...: the same shape as the run
    copied = copy_remote_sidecars(url, tmp, out_dtype)      # io/sidecars.copy_sidecars on that mirror

Only the names ``io/sidecars.py`` copies are fetched (side by side), from the checkpoint folder and the run folder
holding it (inside a merge's ``shared_listings()`` from the run's one listing; else one listing each), so the local
rules (which folder wins, the dtype rewrite of ``config.json``) apply unchanged; ``merge.json`` records the URL the
tokenizer came from, not the mirror.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ckptmerge.io.remote import Url, filesystem, remote_errors
from ckptmerge.io.remote_tree import RemoteTree, covering_listing
from ckptmerge.io.sidecars import SIDECAR_FILES, CopiedSidecars, copy_sidecars

MAX_SIDECAR_BYTES = 256 * 1024 * 1024


def mirror_sidecars(url: Url, folder: Path) -> Path:
    """Fetch ``url``'s sidecars into ``folder/<run>/<checkpoint>/`` and the run's into ``folder/<run>/``;
    returns the local checkpoint path (a folder, or an empty stand-in file for a single-file checkpoint)."""
    fs = filesystem(url)
    run_local = Path(folder) / (url.parent.name or "run")
    local = run_local / url.name
    run_local.mkdir(parents=True, exist_ok=True)
    listed = covering_listing(url.parent)
    if listed is not None:
        fs, run_entries = listed.fs, _entries(listed)
    else:
        with remote_errors(url.parent, "list"):
            run_entries = {_name(e): e for e in fs.ls(url.parent.path, detail=True)}
    own = run_entries.get(url.name)
    wanted = []
    if own is not None and own.get("type") == "file":
        local.touch()  # a single .safetensors file: no folder of its own, only the run's sidecars
    else:
        local.mkdir(exist_ok=True)
        if listed is not None:
            entries = _entries(listed.subtree(url.name))
        else:
            with remote_errors(url, "list"):
                entries = {_name(e): e for e in fs.ls(url.path, detail=True)}
        wanted += _wanted(entries, local)
    _fetch(fs, wanted + _wanted(run_entries, run_local))
    return local


def copy_remote_sidecars(url: Url, dest: Path, out_dtype) -> CopiedSidecars:
    """``copy_sidecars`` for a checkpoint at ``url``: mirrored to a temporary folder, then copied by the local rules."""
    with tempfile.TemporaryDirectory(prefix="ckptmerge-sidecars-") as scratch:
        local = mirror_sidecars(url, Path(scratch))
        copied = copy_sidecars(local, dest, out_dtype)
    if copied.tokenizer_from is None:
        return copied
    where = copied.tokenizer_from["where"]
    return replace(copied, tokenizer_from={"folder": str(url if where == "checkpoint" else url.parent), "where": where})


def _name(entry: dict) -> str:
    return str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]


def _entries(tree: RemoteTree) -> dict[str, dict]:
    """The files and folders directly inside ``tree``'s root, as ``fs.ls(detail=True)`` entries by name."""
    entries = {}
    for key, obj in tree.objects.items():
        name, _, rest = key.partition("/")
        if rest:
            entries.setdefault(name, {"name": f"{tree.root.path}/{name}", "type": "directory"})
        elif name:
            entries[name] = {"name": obj.url.path, "type": "file", "size": obj.size}
    return entries


def _wanted(entries: dict[str, dict], local: Path) -> list[tuple[str, Path]]:
    """(object path, local file) of each sidecar among ``entries``."""
    wanted = []
    for name in SIDECAR_FILES:
        entry = entries.get(name)
        if entry is None or entry.get("type") != "file" or int(entry.get("size") or 0) > MAX_SIDECAR_BYTES:
            continue
        wanted.append((str(entry["name"]), local / name))
    return wanted


def _fetch(fs, wanted: list[tuple[str, Path]]) -> None:
    """Each object of ``wanted`` into its local file, side by side; the first failure (in order) is raised."""
    def one(item: tuple[str, Path]) -> None:
        path, target = item
        with remote_errors(Url(_protocol(fs), path), "read"):
            target.write_bytes(fs.cat_file(path))

    if not wanted:
        return
    with ThreadPoolExecutor(min(len(wanted), 8), thread_name_prefix="ckptmerge-sidecars") as pool:
        list(pool.map(one, wanted))


def _protocol(fs) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else protocol
