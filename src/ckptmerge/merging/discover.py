"""Find the checkpoints of a run directory and order them by training step.

Each entry is first offered to the framework layouts (io/layouts/: HF Trainer, Lightning,
DeepSpeed, Megatron, OLMo-core, torchtitan, litgpt, Composer, Accelerate, nanoGPT), which read
the true step (and tokens) from the framework's own metadata and recognise pointers and copies
(``latest``, ``last.ckpt``, symlinks) to skip. Other entries take their step from the name
(io/layouts/parse_name.py) and tokens / learning rate from ``ckptmerge.json`` or
``trainer_state.json``; otherwise tokens are ``step * tokens_per_step`` when that is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ckptmerge.errors import DiscoveryError
from ckptmerge.io.json_fields import check_log_history, check_types, is_count, is_number, load_json
from ckptmerge.io.layout import detect_layout
from ckptmerge.io.layouts import Layout, match_layout, pointer_reason
from ckptmerge.io.layouts.parse_name import parse_step
from ckptmerge.io.remote import refuse_urls
from ckptmerge.merging.checkpoint import CheckpointRef

META_FILE = "ckptmerge.json"
HF_ROOT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin",
                         "rng_state.pth", "common.pt"})


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
    refuse_urls("discover", "for a run at a URL call ckptmerge.merging.remote_discover.discover_remote(url), "
                "which `ckptmerge inspect URL` and `ckptmerge merge URL` use", run_dir=run_dir)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DiscoveryError(f"{run_dir}: not a directory")
    refs, skipped = [], []
    root_files = _root_model_files(run_dir)
    for child in sorted(run_dir.iterdir()):
        if child.name.startswith("."):
            continue
        why = _skip_reason(child, root_files)
        if why:
            skipped.append((child, why))
            continue
        layout, found = match_layout(child), detect_layout(child)
        if layout is None and found is None:
            continue  # logs, configs, temp folders: not checkpoints
        if (child / "merge.json").is_file():
            skipped.append((child, "a merged output (has merge.json), not a training checkpoint"))
            continue
        ref = _read_ref(child, found[0] if found else "", tokens_per_step, layout)
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
        unreadable = known_unreadable(run_dir)
        found = f"; found layouts ckptmerge knows but cannot read yet: {'; '.join(unreadable)}" if unreadable else ""
        raise DiscoveryError(f"{run_dir}: no checkpoints found (looked for HF folders, *.safetensors, "
                             f"*.pt/*.pth/*.bin/*.ckpt files and DCP folders named like step-1000){found}")
    return Discovery(sorted(refs, key=lambda r: r.step), skipped)


# (glob under the run directory, the layout it shows, what to do): layouts recognised but not read yet
UNREADABLE = (
    ("*/mp_rank_0[1-9]*_model_states.pt", "DeepSpeed tensor parallel (mp_rank_01...)",
     "consolidate with DeepSpeed's ds_to_universal.py"),
    ("*/layer_*-model_states.pt", "DeepSpeed pipeline parallel (layer_*-model_states.pt)",
     "consolidate with DeepSpeed's ds_to_universal.py"),
    ("*/mp_rank_[0-9][0-9]*/model_optim_rng.pt", "Megatron legacy (mp_rank_XX/model_optim_rng.pt)",
     "save with --ckpt-format torch_dist"),
    ("*/pytorch_model_fsdp_*rank*.bin", "FSDP per-rank files (LOCAL_STATE_DICT / use_dcp=False)",
     "save with SHARDED_STATE_DICT or FULL_STATE_DICT"),
)


def known_unreadable(run_dir: Path) -> list[str]:
    """Each layout ckptmerge recognises but cannot read, with an example folder and the fix."""
    found = []
    for pattern, layout, fix in UNREADABLE:
        example = next(iter(sorted(run_dir.glob(pattern))), None)
        if example is not None:
            found.append(f"{layout} in {example.relative_to(run_dir).parts[0]}/: {fix}")
    return found

def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds checkpoints (a run directory), False when it is one checkpoint.

    An HF Trainer output folder is both a model (``trainer.save_model()`` at the root) and a run
    directory (``checkpoint-N/`` beside it): it counts as a run directory.
    """
    path = Path(path)
    if not path.is_dir() or match_layout(path) is not None:
        return False
    if detect_layout(path) is None:
        return True
    return any(c.is_dir() and parse_step(c.name) is not None and (match_layout(c) or detect_layout(c))
               for c in path.iterdir())


def describe_path(path: str | Path, *, tokens_per_step: int | None = None) -> CheckpointRef:
    """CheckpointRef for one explicitly named checkpoint (step from its name or metadata, maybe None)."""
    path = Path(path)
    layout, found = match_layout(path), detect_layout(path)
    return _read_ref(path, found[0] if found else "", tokens_per_step, layout)


def _root_model_files(run_dir: Path) -> set[Path]:
    """The weight files of an HF model saved at the run-directory root (named as ``save_pretrained`` names them)."""
    if not any((run_dir / n).is_file() for n in HF_ROOT_NAMES):
        return set()
    found = detect_layout(run_dir)
    return set(found[1]) if found else set()


def _skip_reason(child: Path, root_files: set[Path]) -> str | None:
    if child in root_files:
        return "the final model at the run-directory root (trainer.save_model()), not a step checkpoint"
    if child.name in NOT_WEIGHTS or child.name.startswith("rng_state"):
        return "a trainer's optimizer / scheduler / RNG / arguments file, not weights"
    return pointer_reason(child)


def _read_ref(path: Path, layout: str, tokens_per_step: int | None, framework: Layout | None = None) -> CheckpointRef:
    if framework is not None:
        info = framework.read_step(path)
        ref = CheckpointRef(path=path, step=info.step, tokens_seen=info.tokens_seen, lr=info.lr,
                            layout=layout or framework.storage, framework=framework.name, meta_source=(info.source,))
    else:
        ref = CheckpointRef(path=path, step=parse_step(path.name), layout=layout, meta_source=("name",))
        if path.is_dir():
            ref = _apply_trainer_state(ref, path / "trainer_state.json")
    if path.is_dir():
        ref = _apply_own_metadata(ref, path / META_FILE)
    if ref.tokens_seen is None and tokens_per_step and ref.step is not None:
        ref = replace(ref, tokens_seen=ref.step * tokens_per_step,
                      meta_source=ref.meta_source + ("--tokens-per-step",))
    return ref


def _apply_trainer_state(ref: CheckpointRef, path: Path) -> CheckpointRef:
    state = load_json(path)
    if state is None:
        return ref
    check_types(path, state, {"global_step": is_count, "num_input_tokens_seen": is_count})
    check_log_history(path, state.get("log_history", []))
    lrs = [e["learning_rate"] for e in state.get("log_history", []) if "learning_rate" in e]
    return replace(ref, step=state.get("global_step", ref.step),
                   tokens_seen=state.get("num_input_tokens_seen") or ref.tokens_seen,
                   lr=lrs[-1] if lrs else ref.lr, meta_source=ref.meta_source + (path.name,))


def _apply_own_metadata(ref: CheckpointRef, path: Path) -> CheckpointRef:
    meta = load_json(path)
    if meta is None:
        return ref
    check_types(path, meta, {"step": is_count, "tokens_seen": is_count, "lr": is_number})
    return replace(ref, step=meta.get("step", ref.step), tokens_seen=meta.get("tokens_seen", ref.tokens_seen),
                   lr=meta.get("lr", ref.lr), meta_source=ref.meta_source + (path.name,),
                   ema_gamma=_power_ema_gamma(path, meta))


def _power_ema_gamma(path: Path, meta: dict) -> float | None:
    """The profile exponent of a power-function EMA snapshot (``averaged.kind == "power_ema"``), else None."""
    averaged = meta.get("averaged")
    if not isinstance(averaged, dict) or averaged.get("kind") != "power_ema":
        return None
    gamma = averaged.get("gamma")
    if not is_number(gamma) or not gamma > 0:
        raise DiscoveryError(f"{path}: averaged.gamma must be a positive number, got {gamma!r}; "
                             f"restore the file or remove the snapshot")
    return float(gamma)


def _check_duplicates(run_dir: Path, refs: list[CheckpointRef]) -> None:
    """Two checkpoints of one step are refused, unless they are power-EMA snapshots of different profiles."""
    by_step: dict[tuple, list[str]] = {}
    for ref in refs:
        by_step.setdefault((ref.step, ref.ema_gamma), []).append(ref.name)
    dups = {s: names for (s, _), names in by_step.items() if len(names) > 1}
    if dups:
        listing = "; ".join(f"step {s}: {', '.join(n)}" for s, n in sorted(dups.items()))
        raise DiscoveryError(f"{run_dir}: several checkpoints claim the same step ({listing}). "
                             f"Move the extra copies out of the run directory.")
