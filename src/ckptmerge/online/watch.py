"""``ckptmerge watch``: keep a merged model of a run up to date while the run trains.

    ckptmerge watch runs/a -o runs/a-watch --method sma:n=5,every=100 --data shakespeare-val

- ``ema`` (``--method ema:alpha=A``): M <- alpha * theta_new + (1 - alpha) * M, seeded with the first checkpoint
  watched: one read per new checkpoint; equals the offline ``ema`` schedule over every checkpoint seen.
- ``sma`` (``--method sma:n=N``, or ``--last N``): a sliding window; the running sum adds the newest checkpoint and subtracts the
  one leaving (two reads per update), and is recomputed exactly every ``--recompute-every`` updates so
  floating-point drift stays bounded. Equals the offline ``sma`` of the same window.

Only checkpoints on the ``every`` grid (step % V == 0) are taken. A checkpoint is read only once its
files have not changed for ``--settle-s`` seconds (and open as a complete checkpoint), so one still being
written is never read. Each update is published atomically to ``OUT/current``; held-out loss of the
newest raw checkpoint and of the merge goes to ``OUT/watch.jsonl``; the state in ``OUT/.watch-state.pt``
lets a restarted ``watch`` continue where it stopped.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ckptmerge.errors import CkptMergeError, ConfigError, NonFiniteTensorError
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.io.fingerprint import checkpoint_files
from ckptmerge.io.publish import atomic_file, atomic_folder
from ckptmerge.io.safetensors_writer import StreamingSafetensorsWriter
from ckptmerge.io.sidecars import copy_sidecars
from ckptmerge.io.tensor_info import TensorInfo
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import META_FILE, discover
from ckptmerge.merging.handback import check_write_back, write_back
from ckptmerge.merging.method_spec import MethodSpec
from ckptmerge.merging.options import MergeOptions

STATE_FILE = ".watch-state.pt"
LOG_FILE = "watch.jsonl"


@dataclass
class WatchConfig:
    run_dir: str
    output: str
    schedule: str = "sma"
    last: int = 5
    every: int | None = None
    alpha: float = 0.2
    data: list[str] = field(default_factory=list)  # held-out data scored after each update
    tokens: int = 16384                            # held-out tokens per data set
    poll_s: float = 30.0
    settle_s: float = 10.0
    recompute_every: int = 8
    tokens_per_step: int | None = None
    options: MergeOptions = field(default_factory=MergeOptions)  # out_dtype, shards, hand-back, ... of current/


WATCH_METHODS = ("sma", "ema")
# MergeOptions that watch cannot honour (it merges in memory on the CPU and writes no merge.json): refused.
UNSUPPORTED_OPTIONS = {"device": "watch accumulates on the CPU", "chunk_bytes": "watch merges whole tensors",
                       "hash": "watch writes no merge.json"}


def watch_config(run_dir: str, output: str, method: MethodSpec, **options) -> WatchConfig:
    """A ``WatchConfig`` from a parsed method (``sma:n=5,every=100``, ``ema:alpha=0.2``); refuses what watch lacks."""
    if method.name not in WATCH_METHODS:
        raise ConfigError(f"watch supports the methods {' and '.join(WATCH_METHODS)}, not {str(method)!r}; "
                          f"merge other schedules with `ckptmerge merge`")
    allowed = {"sma": set(), "ema": {"alpha"}}[method.name]
    if set(method.params) - allowed or (method.name == "ema" and "alpha" not in method.params):
        raise ConfigError(f"watch method {str(method)!r}: watch's {method.name} takes "
                          f"{'alpha (ema:alpha=0.2)' if allowed else 'no parameters'} besides n and every")
    if method.name == "ema" and method.n is not None:
        raise ConfigError(f"watch method {str(method)!r}: watch's ema runs over every checkpoint seen; "
                          f"n (--last) applies to sma only")
    window = {"last": method.n} if method.n is not None else {}
    return WatchConfig(run_dir, output, schedule=method.name, every=method.every,
                       alpha=method.params.get("alpha", 0.2), **window, **options)


@dataclass
class _WatchState:
    window: deque = field(default_factory=deque)  # (step, path) of the checkpoints in the merge
    total: dict = field(default_factory=dict)     # running sum (sma) or running average (ema), fp32
    other: dict = field(default_factory=dict)     # non-float tensors of the newest checkpoint
    last_step: int = -1
    since_recompute: int = 0


class Watcher:
    def __init__(self, cfg: WatchConfig):
        if cfg.schedule not in WATCH_METHODS:
            raise CkptMergeError(f"watch supports the methods sma and ema, not {cfg.schedule!r}")
        refused = [f"{k} ({why})" for k, why in UNSUPPORTED_OPTIONS.items() if k in cfg.options.changed()]
        if refused:
            raise ConfigError(f"watch cannot honour the merge option(s) {'; '.join(refused)}; leave them at their "
                              f"defaults or use `ckptmerge merge`")
        self._out_dtype, self._accum_dtype = cfg.options.torch_dtypes()
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.state = self._load_state()

    def poll(self) -> list[int]:
        """Fold in every new, settled checkpoint; returns the steps processed."""
        done = []
        for ref in self._ready():
            self._fold(ref)
            self._publish(ref)
            self._save_state()
            self._log(ref)
            done.append(ref.step)
        return done

    def run(self, *, once: bool = False, log=print) -> None:
        while True:
            for step in self.poll():
                log(f"watch: merged up to step {step} -> {self.out / 'current'}")
            if once:
                return
            time.sleep(self.cfg.poll_s)

    # --- finding checkpoints --------------------------------------------------------------------
    def _ready(self) -> list[CheckpointRef]:
        found = discover(self.cfg.run_dir, tokens_per_step=self.cfg.tokens_per_step, skip_unparsable=True)
        return [r for r in found.checkpoints if r.step > self.state.last_step and self._on_grid(r.step)
                and self._settled(r.path)]

    def _on_grid(self, step: int) -> bool:
        return self.cfg.every is None or step % self.cfg.every == 0

    def _settled(self, path: Path) -> bool:
        try:
            newest = max((f.stat().st_mtime for f in checkpoint_files(path)), default=time.time())
        except (CkptMergeError, OSError):
            return False  # removed or changing under us; look again on the next scan
        if time.time() - newest < self.cfg.settle_s:
            return False
        try:
            open_checkpoint(path).close()  # complete headers and sizes
        except CkptMergeError:
            return False
        return True

    # --- the running merge ----------------------------------------------------------------------
    def _fold(self, ref: CheckpointRef) -> None:
        s = self.state
        reader = open_checkpoint(ref.path)
        try:
            new = {k: reader.get(k) for k in reader.keys() if reader.info(k).is_float}
            if not s.total:
                s.total = {k: v.to(self._accum_dtype, copy=True) for k, v in new.items()}
            elif self.cfg.schedule == "ema":
                torch._foreach_lerp_([s.total[k] for k in new], [self._accum(v) for v in new.values()],
                                     self.cfg.alpha)
            else:
                torch._foreach_add_([s.total[k] for k in new], [self._accum(v) for v in new.values()])
            s.other = {k: reader.get(k).clone() for k in reader.keys() if not reader.info(k).is_float}
            self._dtypes = {k: reader.info(k).dtype for k in reader.keys()}  # of the newest: the output's dtypes
        finally:
            reader.close()
        s.window.append((ref.step, str(ref.path)))
        s.last_step = ref.step
        if self.cfg.schedule == "sma":
            self._slide()

    def _slide(self) -> None:
        s = self.state
        if len(s.window) > self.cfg.last:
            _, leaving = s.window.popleft()
            reader = open_checkpoint(leaving)
            try:
                torch._foreach_sub_([s.total[k] for k in s.total], [self._accum(reader.get(k)) for k in s.total])
            finally:
                reader.close()
        s.since_recompute += 1
        if s.since_recompute >= self.cfg.recompute_every:
            self._recompute()

    def _recompute(self) -> None:
        """Exact sum over the window, to bound the drift of adding and subtracting."""
        s = self.state
        fresh = {k: torch.zeros_like(v) for k, v in s.total.items()}
        for _, path in s.window:
            reader = open_checkpoint(path)
            try:
                torch._foreach_add_([fresh[k] for k in fresh], [self._accum(reader.get(k)) for k in fresh])
            finally:
                reader.close()
        s.total, s.since_recompute = fresh, 0

    def _accum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._accum_dtype)

    def merged(self) -> dict[str, torch.Tensor]:
        s = self.state
        if self.cfg.schedule == "ema":
            return dict(s.total)
        return {k: v / len(s.window) for k, v in s.total.items()}

    # --- publishing, logging, state -------------------------------------------------------------
    def _publish(self, ref: CheckpointRef) -> None:
        options = self.cfg.options
        if options.as_checkpoint:
            check_write_back(ref)
        merged = {k: v.to(self._out_dtype or self._dtypes[k]) for k, v in self.merged().items()}
        if not options.allow_nonfinite:
            _check_finite(merged, ref)
        tensors = {**merged, **self.state.other}
        names = sorted(tensors)
        with atomic_folder(self.out / "current", force=True) as tmp:
            entries = [(k, TensorInfo(tensors[k].dtype, tuple(tensors[k].shape))) for k in names]
            with StreamingSafetensorsWriter(tmp, entries, max_shard_bytes=options.max_shard_bytes,
                                            direct_io=options.direct_io) as writer:
                for k in names:
                    writer.write(k, tensors[k])
                writer.close()
            sidecars = copy_sidecars(ref.path, tmp, self._out_dtype)  # the tokenizer: checkpoint, else run dir
            if options.as_checkpoint:  # the newest checkpoint's trainer state beside the merged weights
                write_back(ref, tmp)
            meta = {"step": ref.step, "tokens_seen": ref.tokens_seen, "merged": True,
                    "tokenizer_from": sidecars.tokenizer_from,
                    "watch": {"schedule": self.cfg.schedule, "last": self.cfg.last, "every": self.cfg.every,
                              "alpha": self.cfg.alpha if self.cfg.schedule == "ema" else None,
                              "window_steps": [step for step, _ in self.state.window],
                              "options": self.cfg.options.record()}}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def _log(self, ref: CheckpointRef) -> None:
        record = {"step": ref.step, "window": [step for step, _ in self.state.window], "time": time.time()}
        if self.cfg.data:
            from ckptmerge.evaluation.runner import evaluate_paths

            results = evaluate_paths([ref.path, self.out / "current"], self.cfg.data, n_tokens=self.cfg.tokens)
            raw, merged = results.values()
            record.update({f"raw_{d}": r.loss for d, r in raw.items()})
            record.update({f"merged_{d}": r.loss for d, r in merged.items()})
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save_state(self) -> None:
        s = self.state
        payload = {"config": asdict(self.cfg), "window": [list(w) for w in s.window], "total": s.total,
                   "other": s.other, "last_step": s.last_step, "since_recompute": s.since_recompute}
        with atomic_file(self.out / STATE_FILE) as tmp:
            torch.save(payload, tmp)

    def _load_state(self) -> _WatchState:
        path = self.out / STATE_FILE
        self.out.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            return _WatchState()
        saved = _read_state_file(path)
        for key in ("schedule", "last", "every", "alpha"):
            if saved["config"][key] != getattr(self.cfg, key):
                raise CkptMergeError(f"{path}: this watch was started with {key}={saved['config'][key]!r}; "
                                     f"use the same settings or a new -o folder")
        started = saved["config"].get("options", {}).get("accum_dtype", "float32")
        if started != self.cfg.options.accum_dtype:
            raise CkptMergeError(f"{path}: this watch accumulates in {started}; use --accum-dtype {started} "
                                 f"or a new -o folder")
        return _WatchState(deque(tuple(w) for w in saved["window"]), saved["total"], saved["other"],
                           saved["last_step"], saved["since_recompute"])


def _check_finite(merged: dict[str, torch.Tensor], ref: CheckpointRef) -> None:
    bad = [k for k, v in merged.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteTensorError(f"{ref.path}: the merge up to step {ref.step} holds NaN/Inf in {', '.join(bad[:5])}; "
                                   f"current/ is left as it was. Check the checkpoint, or pass --allow-nonfinite")


def _read_state_file(path: Path) -> dict:
    """The watch's own state, loaded with ``weights_only=True``; any damage is a CkptMergeError, not a traceback."""
    fix = "remove it (and current/) to start the watch over"
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as exc:  # truncated, corrupt, or a foreign pickle (UnpicklingError: nothing executed)
        raise CkptMergeError(f"{path}: unreadable watch state ({type(exc).__name__}); {fix}") from exc
    keys = {"config", "window", "total", "other", "last_step", "since_recompute"}
    if not isinstance(saved, dict) or not keys <= set(saved) or not isinstance(saved["config"], dict):
        raise CkptMergeError(f"{path}: not a ckptmerge watch state; {fix}")
    return saved
