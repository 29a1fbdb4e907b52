"""``ckptmerge watch``: keep merged models of a run up to date while the run trains, and log them beside it.

    ckptmerge watch runs/a -o runs/a-watch --method sma:n=5 --method ema:half_life=2000 \\
        --method minus_sqrt:n=8 --every 500 --data held.jsonl --log tensorboard:runs/a/tb

For every new checkpoint on the ``--every`` grid (step % V == 0) whose files have not changed for
``--settle-s`` seconds and open as a complete checkpoint, in step order:

1. it is mirrored under ``OUT/.retained`` (hard links; online/retain.py), so a trainer that deletes old
   checkpoints (``save_total_limit``) never takes one a window still needs;
2. every method's ``OUT/<method>/`` is rewritten by the streaming merge engine (online/watch_methods.py):
   a window method merges its last n checkpoints, a running EMA folds the new checkpoint into its fp32 state
   on disk; either way the folder equals the offline ``merge`` of the same checkpoints, in bounded memory;
3. with ``--data``, the raw checkpoint and every method are evaluated on the same windows (the evaluation
   settings of ``eval``), with each method's paired difference to the raw checkpoint and its standard error;
4. ``OUT/watch.jsonl`` is rewritten and every ``--log`` tracker is sent the steps it does not hold yet.

``OUT/.watch-state.json`` (online/watch_state.py) is rewritten after every piece of work: a watch killed at any
moment and restarted redoes only what was not recorded, and sends no tracker a step twice. A method that fails,
a tracker that fails, a run directory that disappears or a checkpoint that never settles is reported and the
rest goes on.

A run at a URL (``s3://bucket/run``) is listed once per poll (one recursive listing,
``io/remote_tree.py``): a checkpoint is settled when its objects' versions (ETag, size) are unchanged across
``--settle-s``, and read by range requests, never copied. Nothing is retained (an object store has no hard links):
a window method whose checkpoint the trainer deleted fails in one line naming it, and the other methods go on.

An ``OUT`` at a URL (``-o s3://bucket/out``, online/watch_publish.py): the watch works in a local folder
(``--work-dir``; state, running EMA states, retained links, trackers' files) exactly as in a local ``OUT``, and
after each rewrite publishes ``<method>/`` by the commit protocol of ``io/remote_publish.py`` and ``watch.jsonl``
by one PUT. The state records what was published; what a failed or killed upload left behind is published at the
next poll or restart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptmerge.errors import CkptMergeError, ConfigError
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.io.fingerprint import checkpoint_files
from ckptmerge.io.publish import atomic_file
from ckptmerge.io.remote import Url, as_location, is_url, redact
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import discover
from ckptmerge.merging.method_spec import MethodSpec, parse_method
from ckptmerge.merging.options import MergeOptions
from ckptmerge.online.retain import readable_path, release, retain
from ckptmerge.online.watch_methods import WatchMethod, drop_states, publish_window, update_running
from ckptmerge.online.watch_publish import Publication, check_output, publish, stale, work_dir_for
from ckptmerge.online.watch_state import MethodProgress, load_state, save_state

LOG_FILE = "watch.jsonl"
UNSETTLED_GRACE = 10  # a checkpoint still changing 10 x --settle-s after a newer one settled is skipped (reported)


@dataclass
class WatchConfig:
    run_dir: str
    output: str
    methods: list[str] = field(default_factory=lambda: ["sma:n=5"])  # the method language (merging/method_spec.py)
    every: int | None = None                       # only checkpoints with step % every == 0
    data: list[str] = field(default_factory=list)  # held-out data scored after each update
    tokens: int = 16384                            # held-out tokens per data set
    poll_s: float = 30.0
    settle_s: float = 10.0
    tokens_per_step: int | None = None
    options: MergeOptions = field(default_factory=MergeOptions)  # out_dtype, shards, hand-back, ... of OUT/<method>
    eval_settings: object | None = None            # evaluation.settings.EvalSettings (default: its defaults)
    log: list[str] = field(default_factory=list)   # trackers: tensorboard:DIR, mlflow[:URI], wandb[:PROJECT]
    wandb_run_id: str | None = None
    work_dir: str | None = None                    # an -o URL: the local working folder (default: per URL)

    def settings(self) -> dict:
        """What a restarted watch must be given again (compared with the saved state)."""
        run = str(as_location(self.run_dir)) if is_url(self.run_dir) else str(Path(self.run_dir).resolve())
        settings = {"run_dir": run, "methods": list(self.methods), "every": self.every,
                    "data": list(self.data), "tokens": self.tokens}
        if is_url(self.output):  # a working folder belongs to one output URL
            settings["output"] = redact(str(as_location(self.output)))
        return settings


def watch_config(run_dir: str, output: str, methods: list[MethodSpec], **options) -> WatchConfig:
    """A ``WatchConfig`` from parsed methods (``sma:n=5,every=100``, ``ema:alpha=0.2``, ``minus_sqrt:n=8``)."""
    labels = [WatchMethod(m).label for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"watch: the same method twice ({', '.join(labels)}); give each --method once")
    return WatchConfig(run_dir, output, methods=[str(m) for m in methods], **options)


class Watcher:
    def __init__(self, cfg: WatchConfig):
        target = as_location(cfg.output)
        self.cfg, self.out, self.run_dir = cfg, work_dir_for(target, cfg.work_dir), as_location(cfg.run_dir)
        self.target = target if isinstance(target, Url) else None  # an -o URL: published to after each rewrite
        cleaned = check_output(self.target, self.out) if self.target else []  # before any work
        self.remote = isinstance(self.run_dir, Url)
        self._tree = None                                          # a URL run: this poll's listing
        self._observed: dict[str, tuple[tuple, float]] = {}        # a URL checkpoint: its versions, first seen
        self._unsettled = False                                    # a URL checkpoint waits for --settle-s
        self.methods = [WatchMethod(parse_method(m)) for m in cfg.methods]
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = load_state(self.out, cfg.settings())
        for method in self.methods:
            self.state.methods.setdefault(method.label, MethodProgress())
        self._trackers: dict[str, object] = {}
        self._pending_since: dict[int, float] = {}
        self.log = print
        for line in cleaned:
            self._report(line)

    # --- the loop ---------------------------------------------------------------------------------
    def run(self, *, once: bool = False, log=print) -> None:
        self.log = log
        if self.target is not None:
            self._report(f"publishing to {redact(str(self.target))}; working folder {self.out} (state, EMA states, "
                         f"trackers' files: restart with the same --work-dir to resume)")
        try:
            while True:
                self._poll_and_log()
                if once and self._unsettled:  # a URL run: versions must be seen unchanged across --settle-s
                    time.sleep(self.cfg.settle_s)
                    self._poll_and_log()
                if once:
                    self._raise_if_failed()
                    return
                time.sleep(self.cfg.poll_s)
        finally:
            self.close()

    def _poll_and_log(self) -> None:
        for step in self.poll():
            done = [m.label for m in self.methods if self.state.methods[m.label].done_through >= step]
            where = redact(str(self.target)) if self.target is not None else self.out
            self.log(f"watch: step {step} -> {', '.join(done) or 'no method'} in {where}")

    def poll(self) -> list[int]:
        """Take in every new, settled checkpoint; returns the steps taken in."""
        if self.remote:
            self._tree = self._list_remote()  # the one listing of this poll (None: reported, looked again later)
            if self._tree is None:
                self._publish()  # the bucket catches up with the working folder all the same
                return []
        if self.state.seen:
            self._complete()  # what a killed watch left undone for its newest checkpoint; failed methods again
        taken = []
        for ref in self._ready():
            self._take(ref)
            taken.append(ref.step)
        self._send_to_trackers()
        return taken

    def _raise_if_failed(self) -> None:
        """``--once``: a method left behind by an error makes the command fail (exit 2), naming each."""
        failed = {label: p.error for label, p in self.state.methods.items() if p.error}
        unpublished = [item.name for item in self._unpublished()]
        if unpublished:
            failed["publish"] = (f"{', '.join(unpublished)} not published to {redact(str(self.target))} (reported "
                                 f"above); the next watch publishes them")
        if failed:
            raise CkptMergeError("; ".join(f"{label}: {error}" for label, error in failed.items()))

    def close(self) -> None:
        for tracker in self._trackers.values():
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - a tracker never stops the watch
                self._report(f"{tracker.name}: close failed: {exc}")
        self._trackers.clear()

    # --- one checkpoint ---------------------------------------------------------------------------
    def _take(self, ref: CheckpointRef) -> None:
        if not self.remote:
            retain(ref.path, self.run_dir, self.out)
        self._observed.pop(str(ref.path), None)
        self.state.seen.append({"step": ref.step, "tokens_seen": ref.tokens_seen, "path": str(ref.path)})
        self._save()
        self._complete()

    def _complete(self) -> None:
        """Bring every method up to the newest checkpoint taken in, then evaluate it (each step once)."""
        newest = self.state.history()[-1]
        self._update_methods()
        self._publish(files=False)  # the folders just rewritten, before the evaluation
        if self.cfg.data and str(newest.step) not in self.state.evals:
            self._evaluate(newest)
        self._publish(folders=False)  # watch.jsonl
        self._prune()

    def _update_methods(self) -> None:
        for method in self.methods:
            progress = self.state.methods[method.label]
            before = (progress.done_through, progress.error)
            try:
                if method.running:
                    self._fold_pending(method, progress)
                else:
                    self._publish_window(method, progress)
                progress.error = None
            except (CkptMergeError, OSError) as exc:  # this method waits; the others go on
                progress.error = str(exc)
                self._report(f"{method.label}: {exc}")
            if (progress.done_through, progress.error) != before:
                self._save()
        self._point_current()

    def _publish_window(self, method: WatchMethod, progress: MethodProgress) -> None:
        window = [self._readable(r, method) for r in method.select(self.state.history())]
        if not window or window[-1].step <= progress.done_through:
            return  # no new checkpoint on this method's grid
        publish_window(method, window, self.out / method.label, self.cfg.options,
                       recipe=self._recipe(method, window))
        progress.done_through = window[-1].step

    def _fold_pending(self, method: WatchMethod, progress: MethodProgress) -> None:
        """Fold every checkpoint the running EMA has not seen yet, oldest first (none may be skipped)."""
        for ref in method.series(self.state.history()):
            if ref.step <= progress.done_through:
                continue
            new = self._readable(ref, method)
            state = update_running(method, progress.state_ref(), new, self.out, self.cfg.options,
                                   recipe=self._recipe(method, [new]))
            progress.done_through = ref.step
            progress.state_path, progress.state_step, progress.state_tokens = str(state.path), state.step, state.tokens_seen
            self._save()
            drop_states(self.out, method, keep=state.path)

    def _recipe(self, method: WatchMethod, window: list[CheckpointRef]) -> dict:
        return {"watch": {"method": str(method.spec), "run_dir": str(self.run_dir), "window_steps": [r.step for r in window]}}

    def _readable(self, ref: CheckpointRef, method: WatchMethod | None = None) -> CheckpointRef:
        if self.remote:  # read from the bucket, as listed by this poll; nothing retained on an object store
            if self._tree is not None and not self._tree.under(ref.path.relative_to(self.run_dir)):
                label = method.label if method is not None else "the evaluation"
                n = method.window if method is not None else 1
                raise CkptMergeError(f"{ref.path}: deleted from the run before {label} merged it, so {label} is not "
                                     f"updated (no shorter window is published); keep at least {n} checkpoints in "
                                     f"the run (save_total_limit), or sync the run to a local folder and watch that")
            return ref
        return dataclasses.replace(ref, path=readable_path(ref.path, self.run_dir, self.out))

    # --- publishing to an -o URL ------------------------------------------------------------------
    def _publish(self, *, folders: bool = True, files: bool = True) -> None:
        """Bring the -o URL level with the working folder (nothing for a local OUT); a failure is reported and
        retried at the next poll, the merges go on."""
        for item in self._unpublished(folders=folders, files=files):
            try:
                publish(self.target, self.out, item)
            except (CkptMergeError, OSError) as exc:
                self._report(f"{item.name} not published ({redact(str(exc))}); retried at the next poll")
                continue
            self.state.published[item.name] = item.version
            self._save()

    def _unpublished(self, *, folders: bool = True, files: bool = True) -> list[Publication]:
        if self.target is None:
            return []
        wanted = [Publication(m.label, self.state.methods[m.label].done_through) for m in self.methods
                  if folders and self.state.methods[m.label].done_through >= 0]
        if files and self.state.evals:
            wanted.append(Publication.file(LOG_FILE, self._log_text().encode()))
        return stale(self.state, wanted)

    # --- evaluation, trackers ---------------------------------------------------------------------
    def _evaluate(self, ref: CheckpointRef) -> None:
        from ckptmerge.online.watch_eval import evaluate_step

        outputs = {m.label: self.out / m.label for m in self.methods
                   if self.state.methods[m.label].done_through == ref.step}
        try:
            metrics = evaluate_step(self._readable(ref).path, outputs, self.cfg.data, tokens=self.cfg.tokens,
                                    settings=self.cfg.eval_settings)
        except (CkptMergeError, OSError) as exc:
            self._report(f"evaluation at step {ref.step}: {exc}")
            return
        if ref.tokens_seen is not None:
            metrics["eval/tokens_seen"] = float(ref.tokens_seen)
        self.state.evals[str(ref.step)] = metrics
        self._save()
        self._write_log()

    def _send_to_trackers(self) -> None:
        from ckptmerge.online.trackers import make_tracker

        for spec in self.cfg.log:
            try:
                tracker = self._trackers.get(spec) or make_tracker(spec, self.out, wandb_run_id=self.cfg.wandb_run_id)
                if spec not in self._trackers:
                    self._trackers[spec] = tracker
                    held = tracker.logged_steps()  # what a killed watch sent before its ledger was saved
                    ledger = set(self.state.logged.get(spec, [])) | (held or set())
                    self.state.logged[spec] = sorted(ledger)
                for step in sorted(int(s) for s in self.state.evals):
                    if step not in self.state.logged[spec]:
                        tracker.log(step, self.state.evals[str(step)])
                        self.state.logged[spec].append(step)
                        self._save()
            except ConfigError:
                raise  # a bad --log value or a missing extra: the user's to fix
            except Exception as exc:  # noqa: BLE001 - network down, bad key: reported, the merges go on
                self._trackers.pop(spec, None)
                self._report(f"{spec}: logging failed ({type(exc).__name__}: {exc}); retried at the next update")

    # --- finding checkpoints ----------------------------------------------------------------------
    def _list_remote(self):
        from ckptmerge.io.remote_tree import RemoteTree

        try:
            return RemoteTree.list(self.run_dir)
        except (CkptMergeError, OSError) as exc:
            self._report(f"{self.run_dir}: cannot list the run ({exc}); looking again in {self.cfg.poll_s:g} s")
            return None

    def _ready(self) -> list[CheckpointRef]:
        try:
            if self.remote:
                from ckptmerge.merging.remote_discover import discover_remote

                found = discover_remote(self.run_dir, tokens_per_step=self.cfg.tokens_per_step, skip_unparsable=True,
                                        tree=self._tree)
            else:
                found = discover(self.run_dir, tokens_per_step=self.cfg.tokens_per_step, skip_unparsable=True)
        except (CkptMergeError, OSError) as exc:
            self._report(f"{self.run_dir}: cannot list the run ({exc}); looking again in {self.cfg.poll_s:g} s")
            return []
        ready, self._unsettled = [], False
        for ref in found.checkpoints:
            if ref.step <= self.state.last_step or not _on_grid(ref.step, self.cfg.every):
                continue
            if self._settled(ref.path):
                ready.append(ref)
                continue
            if not self._give_up_on(ref, found.checkpoints):
                break  # take checkpoints in step order: wait for this one
        return ready

    def _give_up_on(self, ref: CheckpointRef, everything: list[CheckpointRef]) -> bool:
        """True (reported once) when ``ref`` still changes long after a newer checkpoint settled."""
        newer_settled = any(r.step > ref.step and self._settled(r.path) for r in everything)
        if not newer_settled:
            return False
        since = self._pending_since.setdefault(ref.step, time.monotonic())
        if time.monotonic() - since < UNSETTLED_GRACE * self.cfg.settle_s:
            return False
        self._report(f"{ref.path}: still changing {UNSETTLED_GRACE} x --settle-s after a newer checkpoint settled; "
                     f"skipped")
        return True

    def _settled(self, path: Path | Url) -> bool:
        if self.remote:
            return self._settled_remote(path)
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

    def _settled_remote(self, url: Url) -> bool:
        """The checkpoint's objects listed with the same versions (ETag, size) for ``--settle-s``; then its
        headers and index read once from this listing (an incomplete upload is not settled)."""
        from ckptmerge.merging.remote_discover import open_listed

        objects = self._tree.under(url.relative_to(self.run_dir))
        versions = tuple(sorted((key, obj.size, obj.version) for key, obj in objects.items()))
        seen = self._observed.get(str(url))
        if seen is None or seen[0] != versions:
            seen = self._observed[str(url)] = (versions, time.monotonic())
        if time.monotonic() - seen[1] < self.cfg.settle_s:
            self._unsettled = True
            return False
        try:
            open_listed(self._tree, url).close()
        except (CkptMergeError, OSError):
            return False
        return True

    # --- bookkeeping ------------------------------------------------------------------------------
    def _prune(self) -> None:
        """Release retained checkpoints no window and no lagging running EMA can reach again."""
        if self.remote:
            return  # nothing is retained from an object store
        history = self.state.history()
        keep = {r.path for m in self.methods if not m.running for r in m.select(history)}
        for method in self.methods:
            behind = self.state.methods[method.label].done_through
            keep |= {r.path for r in method.series(history) if r.step > behind}
        keep.add(history[-1].path)
        for ref in history:
            if ref.path not in keep:
                release(ref.path, self.run_dir, self.out)

    def _point_current(self) -> None:
        """With one method, ``OUT/current`` points at its folder (what watch wrote before it kept several)."""
        if self.target is not None or len(self.methods) != 1 or not (self.out / self.methods[0].label).exists():
            return
        link = self.out / "current"
        if link.is_symlink() and os.readlink(link) == self.methods[0].label:
            return
        partial = self.out / ".current.partial"
        partial.unlink(missing_ok=True)
        partial.symlink_to(self.methods[0].label)
        os.replace(partial, link)

    def _write_log(self) -> None:
        with atomic_file(self.out / LOG_FILE) as tmp:
            Path(tmp).write_text(self._log_text())

    def _log_text(self) -> str:
        lines = [json.dumps({"step": int(step), **metrics}) for step, metrics in
                 sorted(self.state.evals.items(), key=lambda item: int(item[0]))]
        return "".join(line + "\n" for line in lines)

    def _save(self) -> None:
        save_state(self.out, self.state)

    def _report(self, message: str) -> None:
        self.log(f"watch: {message}")


def _on_grid(step: int, every: int | None) -> bool:
    return every is None or step % every == 0
