"""The newest checkpoint at a URL, copied whole to a local folder for ``merge --as-checkpoint``'s hand-back.

    tree = RemoteTree.list(Url("s3", "bucket/run/checkpoint-400"))
    copy = copy_checkpoint(tree)        # $TMPDIR/.ckptmerge-handback.tmp-<pid>-<start>-<host>-<rand>/checkpoint-400
    copy.check_pinned(pin.versions)     # the merge read the versions that were copied
    with copy.named_by_url():           # an error about copy.path names the URL instead
        layout.write_back(copy.path, merged, dest)
    copy.remove()

The hand-back writes the newest checkpoint's optimizer, scheduler, loop and RNG state beside the merged weights:
bytes that go into the output whole, so they are fetched whole (fsspec ``get``, the store's own parallel
download), once, before any output is written. The other inputs are never copied (range reads). Every object's
version (ETag, GCS generation, size) is listed before the copy and again after it: an object replaced, added or
removed meanwhile fails in one line, and ``check_pinned`` ties the copy to the versions the merge pinned and read
(``io/remote_layout.py``), so the trainer state handed back is the one saved with the weights that were merged.

The copy is an owner-named temporary of ``io/publish.py`` in the system's temporary folder (``TMPDIR``): it is
removed by ``remove()``, when it is garbage-collected or the interpreter exits (a merge that failed before its
hand-back), and, after a ``kill -9``, by the next copy once its owner process is gone.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ckptmerge.errors import CheckpointFormatError, CkptMergeError
from ckptmerge.io.publish import remove_stale, temp_name
from ckptmerge.io.remote import Url, remote_errors
from ckptmerge.io.remote_tree import RemoteTree

COPY_NAME = "ckptmerge-handback"  # the temporary's name: .ckptmerge-handback.tmp-<pid>-<start>-<host>-<random>


class LocalCopy:
    """A local copy of the objects under ``url`` at ``path`` (a folder, or one file), and their listed versions."""

    def __init__(self, url: Url, folder: Path, versions: dict[str, str]):
        self.url, self.folder, self.versions = url, folder, versions
        self.path = folder / url.name
        self._remove = weakref.finalize(self, shutil.rmtree, str(folder), True)

    def check_pinned(self, pinned: dict[str, str]) -> None:
        """Raise when an object the merge pinned (``PinnedRemoteCheckpoint.versions``) is not the version copied."""
        changed = sorted(url for url, version in pinned.items() if self.versions.get(url) != version)
        if changed:
            raise CheckpointFormatError(f"{self.url}: changed between its copy for --as-checkpoint and the merge "
                                        f"({', '.join(changed[:4])}: another ETag than the one copied); nothing was "
                                        f"published. Rerun the merge once the checkpoint is no longer modified.")

    @contextmanager
    def named_by_url(self) -> Iterator[None]:
        """Errors raised inside name the URL where they would name the local copy (``merge.json`` and every
        message speak of the checkpoint the user gave, never of this temporary)."""
        try:
            yield
        except CkptMergeError as exc:
            exc.args = tuple(a.replace(str(self.path), str(self.url)) if isinstance(a, str) else a for a in exc.args)
            raise

    def remove(self) -> None:
        self._remove()


def copy_checkpoint(tree: RemoteTree, where: Path | None = None) -> LocalCopy:
    """Fetch every object of the checkpoint ``tree`` lists (its root: a folder or one object) into a new temporary
    under ``where`` (default: the system's temporary folder); CheckpointFormatError when one changed meanwhile."""
    where = Path(where or tempfile.gettempdir())
    remove_stale(where, COPY_NAME)  # a killed merge's copy, once its owner is gone
    folder = where / temp_name(COPY_NAME)
    folder.mkdir()
    copy = LocalCopy(tree.root, folder, _versions(tree))
    try:
        targets = {rel: _target(copy, rel) for rel in sorted(tree.objects)}
        _fetch(tree, targets)
        short = [str(tree.objects[rel].url) for rel, t in targets.items() if t.stat().st_size != tree.objects[rel].size]
        again = _versions(RemoteTree.list(tree.root))
        if short or again != copy.versions:
            changed = short or sorted(k for k in set(again) | set(copy.versions) if again.get(k) != copy.versions.get(k))
            raise CheckpointFormatError(f"{tree.root}: changed while it was being copied for --as-checkpoint "
                                        f"({', '.join(changed[:4])}); nothing was written. Rerun the merge once the "
                                        f"checkpoint is no longer modified.")
    except BaseException:
        copy.remove()
        raise
    return copy


def _fetch(tree: RemoteTree, targets: dict[str, Path]) -> None:
    """Download object ``rel`` of ``tree`` to ``targets[rel]``, side by side (fsspec ``get`` of two lists)."""
    for target in targets.values():
        target.parent.mkdir(parents=True, exist_ok=True)
    with remote_errors(tree.root, "read"):
        tree.fs.get([tree.objects[rel].url.path for rel in targets], [str(t) for t in targets.values()])


def _target(copy: LocalCopy, rel: str) -> Path:
    """Where object ``rel`` goes: inside the copy, never outside it (a key holding ``..`` is refused)."""
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or ".." in parts or "\\" in rel:
        raise CheckpointFormatError(f"{copy.url / rel}: an object key that leaves its folder ('..', '/' or '\\\\'); "
                                    f"--as-checkpoint cannot copy it. Rename the object.")
    return copy.path.joinpath(*parts) if rel else copy.path


def _versions(tree: RemoteTree) -> dict[str, str]:
    """``{object URL: "size:version"}``, as ``PinnedRemoteCheckpoint.versions`` records them."""
    return {str(obj.url): f"{obj.size}:{obj.version}" for obj in tree.objects.values()}
