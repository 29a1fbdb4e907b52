"""Experiment trackers a watch logs to, through each tracker's own client (each an optional extra).

    --log tensorboard:DIR     TensorBoard event files (``pip install 'ckptmerge[tensorboard]'``)
    --log mlflow[:URI]        an MLflow tracking URI (default ``sqlite:///OUT/mlflow.db``; ``[mlflow]``)
    --log wandb[:PROJECT]     Weights & Biases; attaches to ``--wandb-run-id`` / ``WANDB_RUN_ID`` (resume="allow")
                              or starts a run of its own; ``WANDB_MODE=offline`` works (``[wandb]``)

Every record is logged at the checkpoint's training step, with ``watch/step`` (the same step) last: a tracker
that holds ``watch/step`` at a step holds the whole record. On restart each tracker is asked which steps it
already holds (TensorBoard's ``EventAccumulator``, MLflow's ``get_metric_history``; W&B cannot be asked, so the
watch's own ledger decides), so no step is sent twice.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ckptmerge.errors import ConfigError, import_optional

MARKER = "watch/step"  # logged last in every record
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def make_tracker(spec: str, out: Path, *, wandb_run_id: str | None = None):
    """A tracker from ``--log NAME[:WHERE]``."""
    name, _, where = spec.partition(":")
    if name not in EXTRAS:
        raise ConfigError(f"--log {spec!r}: choose tensorboard:DIR, mlflow[:URI] or wandb[:PROJECT]")
    _require(name)
    if name == "tensorboard":
        if not where:
            raise ConfigError("--log tensorboard needs a folder: --log tensorboard:DIR")
        return TensorBoardTracker(Path(where))
    if name == "mlflow":
        return MlflowTracker(where or f"sqlite:///{(out / 'mlflow.db').resolve()}", tag=str(out.resolve()))
    return WandbTracker(where or "ckptmerge-watch", run_id=wandb_run_id or os.environ.get("WANDB_RUN_ID"),
                        folder=out)


def _require(name: str) -> None:
    module, extra = EXTRAS[name]
    import_optional(module, extra=extra, needed_by=f"--log {name}")


class TensorBoardTracker:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.name, self.folder = f"tensorboard:{folder}", folder
        self._writer = SummaryWriter(log_dir=str(folder))

    def logged_steps(self) -> set[int]:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

        events = EventAccumulator(str(self.folder), size_guidance={SCALARS: 0})
        events.Reload()
        return {e.step for e in events.Scalars(MARKER)} if MARKER in events.Tags()["scalars"] else set()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.add_scalar(MARKER, step, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MlflowTracker:
    """One MLflow run per watch output folder (found again by its tag on restart)."""

    TAG = "ckptmerge.watch"

    def __init__(self, uri: str, *, tag: str):
        from mlflow.tracking import MlflowClient

        self.name = f"mlflow:{uri}"
        self._client = MlflowClient(tracking_uri=uri)
        experiment = self._client.get_experiment_by_name("ckptmerge-watch")
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment("ckptmerge-watch")
        quoted = tag.replace("'", "\\'")
        runs = self._client.search_runs([experiment_id], filter_string=f"tags.`{self.TAG}` = '{quoted}'")
        self.run_id = runs[0].info.run_id if runs else self._client.create_run(
            experiment_id, tags={self.TAG: tag}, run_name=f"watch {Path(tag).name}").info.run_id

    def logged_steps(self) -> set[int]:
        return {m.step for m in self._client.get_metric_history(self.run_id, MARKER)}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(key, float(value), now_ms, step) for key, value in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch + [Metric(MARKER, float(step), now_ms, step)])

    def close(self) -> None:
        pass


class WandbTracker:
    """Logs against ``watch/step`` (``define_metric``), so records land beside a training run whose own step is ahead."""

    def __init__(self, project: str, *, run_id: str | None, folder: Path):
        import wandb

        self.name = f"wandb:{project}"
        self._run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None, dir=str(folder),
                               reinit="create_new")
        self._run.define_metric(MARKER)
        self._run.define_metric("eval/*", step_metric=MARKER)

    def logged_steps(self) -> None:
        return None  # W&B cannot be asked; the watch's ledger decides

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log({**metrics, MARKER: step})

    def close(self) -> None:
        self._run.finish()
