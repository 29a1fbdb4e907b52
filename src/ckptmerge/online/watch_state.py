"""What a watch has done, in ``OUT/.watch-state.json``: rewritten atomically after every step of work.

Plain JSON (no pickle): the settings it was started with, the checkpoints it has taken in (oldest first), each
method's progress (and a running EMA's state folder), the evaluations recorded per step, the steps each
tracker has been sent, and, for an ``-o`` URL, what was published there (online/watch_publish.py). A watch killed at any moment restarts from the last write: work after it is redone
(deterministically: the same bytes), and a tracker is never sent a step twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptmerge.errors import CkptMergeError
from ckptmerge.io.publish import atomic_file
from ckptmerge.io.remote import as_location
from ckptmerge.merging.checkpoint import CheckpointRef

STATE_FILE = ".watch-state.json"
OLD_STATE_FILE = ".watch-state.pt"  # written by watch before it kept several methods
VERSION = 2


@dataclass
class MethodProgress:
    done_through: int = -1            # newest step this method's output includes
    state_path: str | None = None     # running EMA: its fp32 state folder
    state_step: int | None = None
    state_tokens: int | None = None
    error: str | None = None          # the last failure, reported once per update

    def state_ref(self) -> CheckpointRef | None:
        if self.state_path is None:
            return None
        return CheckpointRef(Path(self.state_path), step=self.state_step, tokens_seen=self.state_tokens)


@dataclass
class WatchState:
    settings: dict = field(default_factory=dict)
    seen: list[dict] = field(default_factory=list)          # {"step", "tokens_seen", "path" (or URL)}, oldest first
    methods: dict[str, MethodProgress] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)    # str(step) -> {metric name: value}
    logged: dict[str, list[int]] = field(default_factory=dict)  # tracker -> steps sent
    published: dict[str, int | str] = field(default_factory=dict)  # -o URL: method -> step, file -> "sha256:..."

    @property
    def last_step(self) -> int:
        return self.seen[-1]["step"] if self.seen else -1

    def history(self) -> list[CheckpointRef]:
        # a local path, or the URL of a checkpoint of a run in an object store (never made a Path: s3:/...)
        return [CheckpointRef(as_location(s["path"]), step=s["step"], tokens_seen=s["tokens_seen"]) for s in self.seen]


def load_state(out: Path, settings: dict) -> WatchState:
    """The saved state of the watch at ``out`` (a fresh one if none); refuses one started with other settings."""
    path = out / STATE_FILE
    if (out / OLD_STATE_FILE).exists() and not path.exists():
        raise CkptMergeError(f"{out / OLD_STATE_FILE}: a watch state of an earlier ckptmerge (one method, in RAM); "
                             f"start this watch with a new -o folder")
    if not path.exists():
        return WatchState(settings=settings)
    state = _parse(path)
    if state.settings != settings:
        changed = sorted(k for k in set(state.settings) | set(settings) if state.settings.get(k) != settings.get(k))
        was = ", ".join(f"{k}={state.settings.get(k)!r}" for k in changed)
        raise CkptMergeError(f"{path}: this watch was started with {was}; use the same settings, or a new -o folder "
                             f"(for an -o URL, a new --work-dir)")
    return state


def save_state(out: Path, state: WatchState) -> None:
    payload = {"version": VERSION, **asdict(state)}
    with atomic_file(out / STATE_FILE) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1) + "\n")


def _parse(path: Path) -> WatchState:
    fix = "remove it and the folders beside it to start the watch over"
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}")
        return WatchState(settings=data["settings"], seen=list(data["seen"]),
                          methods={k: MethodProgress(**v) for k, v in data["methods"].items()},
                          evals=dict(data["evals"]), logged={k: list(v) for k, v in data["logged"].items()},
                          published=dict(data.get("published", {})))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CkptMergeError(f"{path}: unreadable watch state ({exc}); {fix}") from exc


def load_recorded(out: Path) -> dict[str, dict]:
    """The evaluations a watch at ``out`` recorded (``{str(step): metrics}``), whatever its settings."""
    path = out / STATE_FILE
    if not path.exists():
        raise CkptMergeError(f"{out}: no watch state here ({STATE_FILE}); give the -o folder of a watch (for an -o URL, its --work-dir)")
    return _parse(path).evals
