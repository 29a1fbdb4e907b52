"""Find the checkpoints of a run directory and order them by training step.

Step numbers are parsed from the names people use::

    step-1000  step_1000  step1000 (Pythia revisions)   checkpoint-1000 (HF Trainer)
    iter_0001000 (Megatron)   global_step1000 (DeepSpeed)   ckpt_1000.pt   model_001000.safetensors

Tokens seen and learning rate come from metadata when present: ckptmerge's own
``ckptmerge.json`` (written by its trainer and by merges) or HF's ``trainer_state.json``;
otherwise tokens are ``step * tokens_per_step`` when that is given.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ckptmerge.errors import DiscoveryError
from ckptmerge.io.layout import detect_layout
from ckptmerge.merging.checkpoint import CheckpointRef

META_FILE = "ckptmerge.json"
_STEP_NAME = re.compile(
    r"^(?:step|checkpoint|iter|ckpt|model|global_step|revision|rev)[-_]?(\d+)$", re.IGNORECASE)


def parse_step(name: str) -> int | None:
    """Step number in a checkpoint name, or None. ``parse_step("iter_0001000") == 1000``."""
    stem = name
    for suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = _STEP_NAME.match(stem)
    return int(match.group(1)) if match else None


@dataclass
class Discovery:
    """The ordered checkpoints of a run, plus what was skipped and why."""

    checkpoints: list[CheckpointRef]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def discover(run_dir: str | Path, *, tokens_per_step: int | None = None,
             skip_unparsable: bool = False) -> Discovery:
    """Find checkpoints in ``run_dir`` and order them by step.

    Args:
        run_dir: folder whose children are checkpoints (folders or files).
        tokens_per_step: fallback for tokens_seen when no metadata gives it.
        skip_unparsable: skip checkpoints whose step cannot be parsed (listed in ``skipped``)
            instead of raising.

    Raises:
        DiscoveryError: no checkpoints, unparsable names (without ``skip_unparsable``), or duplicate steps.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DiscoveryError(f"{run_dir}: not a directory")
    refs, skipped = [], []
    for child in sorted(run_dir.iterdir()):
        found = None if child.name.startswith(".") else detect_layout(child)
        if found is None:
            continue  # logs, configs, temp folders: not checkpoints
        if (child / "merge.json").is_file():
            skipped.append((child, "a merged output (has merge.json), not a training checkpoint"))
            continue
        ref = _read_ref(child, found[0], tokens_per_step)
        if ref.step is None:
            skipped.append((child, "no step number in its name or metadata"))
        else:
            refs.append(ref)
    unparsable = [p for p, why in skipped if why.startswith("no step")]
    if unparsable and not skip_unparsable:
        names = ", ".join(p.name for p in unparsable)
        raise DiscoveryError(f"{run_dir}: cannot tell the step of: {names}. Rename them (e.g. step-1000), "
                             f"or pass --skip-unparsable to leave them out.")
    _check_duplicates(run_dir, refs)
    if not refs:
        raise DiscoveryError(f"{run_dir}: no checkpoints found (looked for HF folders, *.safetensors, "
                             f"*.pt/*.pth/*.bin/*.ckpt files and DCP folders named like step-1000)")
    return Discovery(sorted(refs, key=lambda r: r.step), skipped)


def describe_path(path: str | Path, *, tokens_per_step: int | None = None) -> CheckpointRef:
    """CheckpointRef for one explicitly named checkpoint (step from its name or metadata, maybe None)."""
    path = Path(path)
    found = detect_layout(path)
    return _read_ref(path, found[0] if found else "", tokens_per_step)


def _read_ref(path: Path, layout: str, tokens_per_step: int | None) -> CheckpointRef:
    ref = CheckpointRef(path=path, step=parse_step(path.name), layout=layout, meta_source=("name",))
    if path.is_dir():
        ref = _apply_trainer_state(ref, path / "trainer_state.json")
        ref = _apply_own_metadata(ref, path / META_FILE)
    if ref.tokens_seen is None and tokens_per_step and ref.step is not None:
        ref = replace(ref, tokens_seen=ref.step * tokens_per_step,
                      meta_source=ref.meta_source + ("--tokens-per-step",))
    return ref


def _load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8
        raise DiscoveryError(f"{path}: invalid JSON ({str(exc)[:200]}); fix or remove the file") from exc
    return data if isinstance(data, dict) else None


def _apply_trainer_state(ref: CheckpointRef, path: Path) -> CheckpointRef:
    state = _load_json(path)
    if state is None:
        return ref
    _check_types(path, state, {"global_step": _is_count, "num_input_tokens_seen": _is_count})
    _check_log_history(path, state.get("log_history", []))
    lrs = [e["learning_rate"] for e in state.get("log_history", []) if "learning_rate" in e]
    return replace(ref, step=state.get("global_step", ref.step),
                   tokens_seen=state.get("num_input_tokens_seen") or ref.tokens_seen,
                   lr=lrs[-1] if lrs else ref.lr, meta_source=ref.meta_source + (path.name,))


def _apply_own_metadata(ref: CheckpointRef, path: Path) -> CheckpointRef:
    meta = _load_json(path)
    if meta is None:
        return ref
    _check_types(path, meta, {"step": _is_count, "tokens_seen": _is_count, "lr": _is_number})
    return replace(ref, step=meta.get("step", ref.step), tokens_seen=meta.get("tokens_seen", ref.tokens_seen),
                   lr=meta.get("lr", ref.lr), meta_source=ref.meta_source + (path.name,))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(path: Path, data: dict, checks: dict) -> None:
    """Each present, non-null field must pass its check; else a DiscoveryError naming the field."""
    for key, ok in checks.items():
        if data.get(key) is not None and not ok(data[key]):
            raise DiscoveryError(f"{path}: field {key!r} is {str(data[key])[:80]!r} ({type(data[key]).__name__}), "
                                 f"expected a {'number' if ok is _is_number else 'non-negative integer'}; "
                                 f"fix or remove the file")


def _check_log_history(path: Path, history: object) -> None:
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise DiscoveryError(f"{path}: 'log_history' must be a list of objects, got {type(history).__name__}; "
                             f"fix or remove the file")
    for entry in history:
        _check_types(path, entry, {"learning_rate": _is_number})


def _check_duplicates(run_dir: Path, refs: list[CheckpointRef]) -> None:
    by_step: dict[int, list[str]] = {}
    for ref in refs:
        by_step.setdefault(ref.step, []).append(ref.name)
    dups = {s: names for s, names in by_step.items() if len(names) > 1}
    if dups:
        listing = "; ".join(f"step {s}: {', '.join(n)}" for s, n in sorted(dups.items()))
        raise DiscoveryError(f"{run_dir}: several checkpoints claim the same step ({listing}). "
                             f"Move the extra copies out of the run directory.")
