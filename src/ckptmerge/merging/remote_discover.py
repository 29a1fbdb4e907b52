"""Discovery of a run that lives at a URL (``s3://bucket/run``): the rules of ``merging/discover.py`` applied
to one recursive listing of the run (``io/remote_tree.py``), so a run of any size costs a few LIST calls and
one small read per metadata file (``trainer_state.json``, ``ckptmerge.json``), never a HEAD per object.

HF folders (``checkpoint-N/`` with or without ``trainer_state.json``) and single ``.safetensors`` files are
recognised; the trainers' own layouts (``io/layouts/``) are local-only so far.
"""

from __future__ import annotations

import json
from dataclasses import replace

from ckptmerge.errors import DiscoveryError
from ckptmerge.io.json_fields import check_log_history, check_types, is_count, is_number
from ckptmerge.io.layouts.parse_name import parse_step
from ckptmerge.io.remote import Url, as_location
from ckptmerge.io.remote_layout import detect_remote_layout
from ckptmerge.io.remote_tree import RemoteTree
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import HF_ROOT_NAMES, META_FILE, NOT_WEIGHTS, Discovery

TRAINER_STATE = "trainer_state.json"


def discover_remote(run: Url, *, tokens_per_step: int | None = None, skip_unparsable: bool = False) -> Discovery:
    """The checkpoints under ``run``, ordered by step (see ``merging.discover.discover`` for the rules)."""
    run = as_location(run)
    tree = RemoteTree.list(run)
    if not tree.exists() or tree.is_file(""):
        raise DiscoveryError(f"{run}: no objects under this prefix (check the URL; a run is a folder of checkpoints)")
    root_files = _root_model_keys(tree)
    refs, skipped = [], []
    for name in tree.children(""):
        if name.startswith("."):
            continue
        if name in root_files or name in NOT_WEIGHTS or name.startswith("rng_state"):
            skipped.append((tree.url(name), "the final model at the run root, or a trainer's state file, not a "
                                             "step checkpoint"))
            continue
        if detect_remote_layout(tree, name) is None:
            continue
        if tree.is_file(f"{name}/merge.json"):
            skipped.append((tree.url(name), "a merged output (has merge.json), not a training checkpoint"))
            continue
        ref = read_remote_ref(tree, name, tokens_per_step)
        (refs.append(ref) if ref.step is not None else skipped.append((ref.path, "no step number in its name or "
                                                                                  "metadata")))
    _check(run, refs, skipped, skip_unparsable)
    return Discovery(sorted(refs, key=lambda r: r.step), skipped)


def is_remote_run(url: Url) -> tuple[bool, RemoteTree]:
    """Whether ``url`` holds checkpoints (a run) rather than being one checkpoint; and its listing."""
    tree = RemoteTree.list(url)
    if detect_remote_layout(tree, "") is None:
        return True, tree
    return any(parse_step(n) is not None and detect_remote_layout(tree, n) for n in tree.children("")), tree


def describe_remote(url: Url, *, tokens_per_step: int | None = None) -> CheckpointRef:
    """A CheckpointRef for one explicitly named remote checkpoint (its step may be None)."""
    url = as_location(url)
    tree = RemoteTree.list(url)
    return read_remote_ref(tree, "", tokens_per_step)


def read_remote_ref(tree: RemoteTree, rel: str, tokens_per_step: int | None) -> CheckpointRef:
    """Step, tokens and LR of checkpoint ``rel``: its name, then ``trainer_state.json``, then ``ckptmerge.json``."""
    url = tree.url(rel)
    found = detect_remote_layout(tree, rel)
    ref = CheckpointRef(path=url, step=parse_step(url.name), layout=found[0] if found else "", meta_source=("name",))
    state = _json(tree, rel, TRAINER_STATE)
    if state is not None:
        ref = _apply_trainer_state(ref, tree.url(f"{rel}/{TRAINER_STATE}" if rel else TRAINER_STATE), state)
    meta = _json(tree, rel, META_FILE)
    if meta is not None:
        check_types(url / META_FILE, meta, {"step": is_count, "tokens_seen": is_count, "lr": is_number})
        ref = replace(ref, step=meta.get("step", ref.step), tokens_seen=meta.get("tokens_seen", ref.tokens_seen),
                      lr=meta.get("lr", ref.lr), meta_source=ref.meta_source + (META_FILE,))
    if ref.tokens_seen is None and tokens_per_step and ref.step is not None:
        ref = replace(ref, tokens_seen=ref.step * tokens_per_step, meta_source=ref.meta_source + ("--tokens-per-step",))
    return ref


def _apply_trainer_state(ref: CheckpointRef, where: Url, state: dict) -> CheckpointRef:
    check_types(where, state, {"global_step": is_count, "num_input_tokens_seen": is_count})
    check_log_history(where, state.get("log_history", []))
    lrs = [e["learning_rate"] for e in state.get("log_history", []) if "learning_rate" in e]
    return replace(ref, step=state.get("global_step", ref.step), framework="hf-trainer",
                   tokens_seen=state.get("num_input_tokens_seen") or ref.tokens_seen,
                   lr=lrs[-1] if lrs else ref.lr, meta_source=(TRAINER_STATE,))


def _json(tree: RemoteTree, rel: str, name: str) -> dict | None:
    key = f"{rel}/{name}" if rel else name
    if not tree.is_file(key):
        return None
    try:
        data = json.loads(tree.read_bytes(key).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise DiscoveryError(f"{tree.url(key)}: invalid JSON ({str(exc)[:200]}); fix or remove the file") from exc
    return data if isinstance(data, dict) else None


def _root_model_keys(tree: RemoteTree) -> set[str]:
    if not any(tree.is_file(n) for n in HF_ROOT_NAMES):
        return set()
    found = detect_remote_layout(tree, "")
    return {obj.url.name for obj in found[1]} if found else set()


def _check(run: Url, refs: list[CheckpointRef], skipped: list, skip_unparsable: bool) -> None:
    unparsable = [p for p, why in skipped if why.startswith("no step")]
    if unparsable and not skip_unparsable:
        raise DiscoveryError(f"{run}: cannot tell the step of: {', '.join(p.name for p in unparsable)}. Rename them "
                             f"(e.g. step-1000), or pass --skip-unparsable to leave them out.")
    steps: dict[int, list[str]] = {}
    for ref in refs:
        steps.setdefault(ref.step, []).append(ref.name)
    dups = {s: n for s, n in steps.items() if len(n) > 1}
    if dups:
        listing = "; ".join(f"step {s}: {', '.join(n)}" for s, n in sorted(dups.items()))
        raise DiscoveryError(f"{run}: several checkpoints claim the same step ({listing}). Move the extra copies "
                             f"out of the run.")
    if not refs:
        raise DiscoveryError(f"{run}: no checkpoints found (looked for HF folders and *.safetensors named like "
                             f"step-1000)")


def remote_candidates(inputs: list, *, tokens_per_step: int | None = None, skip_unparsable: bool = False,
                      keep_order: bool = False) -> tuple[list[CheckpointRef], list[tuple[Url, str]]]:
    """The checkpoints of ``merge URL ...``: a run's discovered checkpoints, or the named ones (oldest first, or as
    given with ``keep_order``)."""
    locations = [as_location(p) for p in inputs]
    if len(locations) == 1 and isinstance(locations[0], Url) and not keep_order and is_remote_run(locations[0])[0]:
        found = discover_remote(locations[0], tokens_per_step=tokens_per_step, skip_unparsable=skip_unparsable)
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
    return sum(obj.size for obj in RemoteTree.list(url).objects.values())
