"""Discovery of a run that lives at a URL (``s3://bucket/run``): the rules of ``merging/discover.py`` applied
to one recursive listing of the run (``io/remote_tree.py``), so a run of any size costs a few LIST calls and
one small read per metadata file (``trainer_state.json``, ``ckptmerge.json``, a trainer's step file; the entries
are told side by side on ``DISCOVERY_THREADS`` threads), never a HEAD per object. Inside a merge
(``remote_tree.shared_listings``) the same listing then serves pinning, opening and the sidecars.

Each entry is a ``CheckpointPath`` (``io/remote_layout.py``): a pathlib-like view of the listing on which the
trainers' layouts (``io/layouts/``) and the local discovery's own helpers run unchanged, so the same checkpoints,
steps, frameworks and skip reasons come out as for a local copy of the run. A layout whose files cannot be read
from a URL yet (torch pickles) is refused in one line naming the checkpoint and the framework.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ckptmerge.errors import DiscoveryError
from ckptmerge.io.layouts import Layout
from ckptmerge.io.layouts.parse_name import parse_step
from ckptmerge.io.remote import Url, as_location
from ckptmerge.io.remote_layout import CheckpointPath, framework_call, match_remote_layout
from ckptmerge.io.remote_tree import RemoteTree
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import (
    HF_ROOT_NAMES,
    Discovery,
    _check_duplicates,
    _read_ref,
    _skip_reason,
    known_unreadable,
)


DISCOVERY_THREADS = 8


def discover_remote(run: Url, *, tokens_per_step: int | None = None, skip_unparsable: bool = False,
                    tree: RemoteTree | None = None) -> Discovery:
    """The checkpoints under ``run``, ordered by step (see ``merging.discover.discover`` for the rules); from
    ``tree`` when the caller already listed ``run`` (watch: one listing per poll)."""
    run = as_location(run)
    tree = tree if tree is not None else RemoteTree.shared(run)
    if not tree.exists() or tree.is_file(""):
        raise DiscoveryError(f"{run}: no objects under this prefix (check the URL; a run is a folder of checkpoints)")
    root = CheckpointPath(tree)
    root_files = _root_model_files(root)
    refs, skipped = [], []
    children = [c for c in root.iterdir() if not c.name.startswith(".")]
    with ThreadPoolExecutor(DISCOVERY_THREADS, thread_name_prefix="ckptmerge-discover") as pool:
        # each entry's small reads (trainer_state.json, a layout's step file) are independent: sent side by side;
        # the results (and the first error, in listing order) come back in listing order
        for child, found in zip(children, pool.map(lambda c: _entry(c, root_files, tokens_per_step), children)):
            if isinstance(found, str):
                skipped.append((child.url, found))
            elif found is not None:
                (refs.append(found) if found.step is not None else
                 skipped.append((found.path, "no step number in its name or metadata")))
    _check(run, root, refs, skipped, skip_unparsable)
    return Discovery(sorted(refs, key=lambda r: r.step), skipped)


def _entry(child: CheckpointPath, root_files: set, tokens_per_step: int | None) -> CheckpointRef | str | None:
    """One entry of the run: its CheckpointRef, why it is skipped, or None when it is no checkpoint."""
    why = _skip_reason(child, root_files)
    if why:
        return why
    layout, found = match_remote_layout(child), child.plain_layout()
    if layout is None and found is None:
        return None  # logs, configs, temp folders: not checkpoints
    if (child / "merge.json").is_file():
        return "a merged output (has merge.json), not a training checkpoint"
    return _remote_ref(child, found[0] if found else "", tokens_per_step, layout)


def is_remote_run(url: Url) -> tuple[bool, RemoteTree]:
    """Whether ``url`` holds checkpoints (a run) rather than being one checkpoint; and its listing
    (``merging.discover.is_run_dir``'s rule)."""
    tree = RemoteTree.shared(url)
    root = CheckpointPath(tree)
    if not root.is_dir() or match_remote_layout(root) is not None:
        return False, tree
    if root.plain_layout() is None:
        return True, tree
    return any(c.is_dir() and parse_step(c.name) is not None and (match_remote_layout(c) or c.plain_layout())
               for c in root.iterdir()), tree


def open_listed(tree: RemoteTree, url: Url):
    """A reader for the checkpoint at ``url`` inside the listed ``tree`` (``io.remote_layout.open_remote_checkpoint``
    without listing it again): its headers and index are read, so an incomplete upload fails here."""
    path = CheckpointPath(tree)
    rel = url.relative_to(tree.root)
    path = path / rel if rel else path
    layout = match_remote_layout(path)
    if layout is not None:
        return framework_call(layout, layout.open, path)
    return path.open_plain()


def describe_remote(url: Url, *, tokens_per_step: int | None = None) -> CheckpointRef:
    """A CheckpointRef for one explicitly named remote checkpoint (its step may be None)."""
    url = as_location(url)
    path = CheckpointPath(RemoteTree.shared(url))
    found = path.plain_layout() if path.exists() else None
    layout = match_remote_layout(path) if path.exists() else None
    return _remote_ref(path, found[0] if found else "", tokens_per_step, layout)


def _remote_ref(path: CheckpointPath, layout: str, tokens_per_step: int | None, framework: Layout | None
                ) -> CheckpointRef:
    """``merging.discover._read_ref`` on the listing (the layout's ``read_step``, ``trainer_state.json``,
    ``ckptmerge.json``), the checkpoint named by its URL."""
    if framework is None:
        ref = _read_ref(path, layout, tokens_per_step)
    else:
        ref = framework_call(framework, lambda p: _read_ref(p, layout, tokens_per_step, framework), path)
    return replace(ref, path=path.url)


def _root_model_files(root: CheckpointPath) -> set[CheckpointPath]:
    """The weight files of an HF model saved at the run root (``merging.discover._root_model_files``)."""
    if not any((root / n).is_file() for n in HF_ROOT_NAMES):
        return set()
    found = root.plain_layout()
    return set(found[1]) if found else set()


def _check(run: Url, root: CheckpointPath, refs: list[CheckpointRef], skipped: list, skip_unparsable: bool) -> None:
    unparsable = [p for p, why in skipped if why.startswith("no step")]
    if unparsable and not skip_unparsable:
        raise DiscoveryError(f"{run}: cannot tell the step of: {', '.join(p.name for p in unparsable)}. Rename them "
                             f"(e.g. step-1000), or pass --skip-unparsable to leave them out.")
    _check_duplicates(run, refs)
    if not refs:
        unreadable = known_unreadable(root)
        found = f"; found layouts ckptmerge knows but cannot read yet: {'; '.join(unreadable)}" if unreadable else ""
        raise DiscoveryError(f"{run}: no checkpoints found (looked for HF folders, *.safetensors, "
                             f"*.pt/*.pth/*.bin/*.ckpt files and DCP folders named like step-1000){found}")


def remote_candidates(inputs: list, *, tokens_per_step: int | None = None, skip_unparsable: bool = False,
                      keep_order: bool = False) -> tuple[list[CheckpointRef], list[tuple[Url, str]]]:
    """The checkpoints of ``merge URL ...``: a run's discovered checkpoints, or the named ones (oldest first, or as
    given with ``keep_order``)."""
    locations = [as_location(p) for p in inputs]
    if len(locations) == 1 and isinstance(locations[0], Url) and not keep_order:
        run, tree = is_remote_run(locations[0])
        if run:  # discovery works from the same listing
            found = discover_remote(locations[0], tokens_per_step=tokens_per_step, skip_unparsable=skip_unparsable,
                                    tree=tree)
            return found.checkpoints, found.skipped
    local = [str(p) for p in locations if not isinstance(p, Url)]
    if local:
        raise DiscoveryError(f"{local[0]}: local paths and URLs cannot be mixed in one merge; copy one side over")
    refs = [describe_remote(u, tokens_per_step=tokens_per_step) for u in locations]
    if all(r.step is not None for r in refs) and not keep_order:
        refs.sort(key=lambda r: r.step)
    return refs, []


def checkpoint_bytes(url: Url) -> int:
    """Bytes of every object of the checkpoint at ``url`` (one listing)."""
    return sum(obj.size for obj in RemoteTree.shared(url).objects.values())
