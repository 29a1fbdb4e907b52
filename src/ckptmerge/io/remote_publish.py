"""Publishing an output folder to an object store, where there is no atomic rename: upload, mark, then copy in.

    check_remote_destination(url, force)          # before any work
    with remote_folder(url, force=force) as tmp:  # a local staging folder; on success it becomes ``url``
        ...write the merged folder into tmp...
    clean_remote(url)                              # what killed uploads left: removed, or their commit finished

The commit protocol (docs/storage.md):

1. Every file is uploaded under a hidden temporary prefix beside the destination,
   ``.<name>.tmp-<pid>-<start>-<host>-<random>/`` (the owner-naming of ``io/publish.py``; discovery skips
   dot-names). Large files go up as multipart uploads (the backend's own ``put_file``).
2. The destination is checked again (refused without ``--force`` if anything is there), then the marker
   ``<temporary>/.ckptmerge-commit`` is written: from here on the temporary holds a complete, verified output.
3. The destination's old objects are deleted (in the reverse of the copy order: ``config.json`` and ``merge.json``
   first) and the temporary's objects are copied in by the server (no download), each after every object it
   names or vouches for (``_copy_rank``):

   a. everything else: sidecars, tokenizer, and the hand-back's trainer state (``merge --as-checkpoint``:
      optimizer, scheduler, RNG files, DCP ``.distcp`` data, DeepSpeed's tag folder);
   b. the weights (``*.safetensors``): HF Trainer and accelerate fail loudly on a folder without them, where a
      missing optimizer, scheduler or RNG file is skipped silently (a fresh optimizer, a reseeded loader);
   c. the pointers a reader or trainer takes as "this checkpoint is complete" (``POINTERS``): a shard index, a
      DCP folder's ``.metadata`` (torchtitan resumes from the newest ``step-N/`` holding one), HF Trainer's
      ``trainer_state.json`` (without it the Trainer restarts at step 0), DeepSpeed's ``latest`` (the tag
      ``load_checkpoint`` opens); a deeper one first, so a folder's ``.metadata`` precedes the ``latest`` above it;
   d. ``merge.json``, and ``config.json`` last. A destination without ``config.json`` does not load as a model,
      and one without ``merge.json`` is not a finished ckptmerge output.

   So a destination copied in part lacks its pointers: a trainer pointed at it finds no checkpoint or fails on a
   missing file, and never resumes from a trainer state older or smaller than the one handed back.
4. The temporary prefix is deleted.

A run killed in step 1 leaves only its temporary, which ``clean`` deletes once its owner is gone. A run killed in
step 3 or 4 leaves a marked temporary, and ``clean`` finishes its commit (steps 3-4 again, which are idempotent).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckptmerge.errors import OutputExistsError
from ckptmerge.io.publish import _TEMP_RE, owner_alive, temp_name
from ckptmerge.io.remote import Url, filesystem, remote_errors

MARKER = ".ckptmerge-commit"
LAST = ("merge.json", "config.json")  # copied in this order, after everything else
POINTERS = ("model.safetensors.index.json", "pytorch_model.bin.index.json", ".metadata", "trainer_state.json",
            "latest")  # names of objects that point at or vouch for others: copied after them (step 3c)


def check_remote_destination(url: Url, force: bool) -> None:
    """Raise OutputExistsError now, before any work, if anything exists at ``url`` and ``force`` is off."""
    if not force and _keys(filesystem(url), url):
        raise OutputExistsError(f"{url}: already exists; pass --force to replace it, or choose another output")


@contextmanager
def remote_folder(url: Url, *, force: bool = False) -> Iterator[Path]:
    """A local staging folder that is uploaded and committed to ``url`` when the block succeeds (see above)."""
    check_remote_destination(url, force)
    staging = Path(tempfile.mkdtemp(prefix="ckptmerge-upload-"))
    try:
        yield staging
        commit_upload(staging, url, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit_upload(local: Path, url: Url, force: bool) -> None:
    """Steps 1-4: upload ``local``'s files under a temporary prefix, mark it, copy it into ``url``, delete it."""
    fs = filesystem(url)
    tmp = url.parent / temp_name(url.name)
    try:
        with remote_errors(tmp, "write"):
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                fs.put_file(str(file), (tmp / file.relative_to(local).as_posix()).path)
        check_remote_destination(url, force)  # appeared while we merged (another run)?
        with remote_errors(tmp, "write"):
            fs.pipe_file((tmp / MARKER).path, json.dumps({"destination": str(url)}).encode())
    except BaseException:
        _delete(fs, tmp)  # nothing of ours reached the destination
        raise
    finish_commit(fs, tmp, url)


def finish_commit(fs, tmp: Url, url: Url) -> None:
    """Steps 3-4 for a marked temporary: make ``url`` hold exactly the temporary's objects, then delete it."""
    keys = [k for k in _keys(fs, tmp) if k != MARKER]
    with remote_errors(url, "write"):
        old = _keys(fs, url)
        for key in sorted(old, key=_copy_rank, reverse=True):  # config.json, merge.json, the pointers first
            fs.rm_file((url / key).path)
        for key in sorted(keys, key=_copy_rank):
            fs.copy((tmp / key).path, (url / key).path)
    _delete(fs, tmp)


def _copy_rank(key: str) -> tuple[int, int, str]:
    """Where ``key`` goes in the copy order of step 3: (tier, deeper pointers first, key)."""
    if key in LAST:
        return 3 + LAST.index(key), 0, key
    if key.rsplit("/", 1)[-1] in POINTERS:
        return 2, -key.count("/"), key
    return (1 if key.endswith(".safetensors") else 0), 0, key


def clean_remote(url: Url) -> list[str]:
    """For every temporary at or under ``url`` whose owner is gone: finish its commit when it was marked, else
    delete it. Returns one line per temporary handled. Live owners' and other hosts' temporaries are kept."""
    fs = filesystem(url)
    done = []
    for tmp in _temporaries(fs, url):
        match = _TEMP_RE.match(tmp.name)
        if owner_alive(int(match["pid"]), match["start"], match["host"]):
            continue
        dest = tmp.parent / match["name"]
        if MARKER in _keys(fs, tmp):
            finish_commit(fs, tmp, dest)
            done.append(f"finished the commit of {dest} (a killed run had uploaded it completely)")
        else:
            _delete(fs, tmp)
            done.append(f"removed {tmp}")
    return done


def _temporaries(fs, url: Url) -> list[Url]:
    """Temporaries beside ``url`` (for its name) and anywhere below it."""
    found = []
    with remote_errors(url, "list"):
        beside = fs.ls(url.parent.path, detail=False) if "/" in url.path else []
        below = fs.find(url.path, withdirs=True)
    for key in [*beside, *below]:
        parts = str(key).rstrip("/").split("/")
        for depth, part in enumerate(parts):
            match = _TEMP_RE.match(part)
            if match and (key in below or match["name"] == url.name):
                found.append(Url(url.protocol, "/".join(parts[:depth + 1])))
                break
    return sorted(set(found), key=str)


def _keys(fs, url: Url) -> list[str]:
    """Every object key under ``url``, relative to it ([] when there is none)."""
    with remote_errors(url, "list"):
        fs.invalidate_cache(url.path)
        try:
            found = fs.find(url.path)
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise
            return []
    return [k[len(url.path):].lstrip("/") for k in found if k.startswith(url.path + "/")]


def _delete(fs, url: Url) -> None:
    """Delete every object under ``url``; best effort (``clean`` retries what is left)."""
    try:
        keys = _keys(fs, url)
        if keys:
            fs.rm([(url / k).path for k in keys])
    except Exception:  # noqa: BLE001 - already failing, or cleaning up: the first error is the one to report
        pass
