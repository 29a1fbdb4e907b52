"""One merge recipe a watch keeps up to date, published to ``OUT/<label>/`` by the streaming merge engine.

Two kinds, both written by ``cm.merge`` (bounded memory whatever the model size, every ``MergeOptions``
honoured, the same bytes as an offline merge):

- a **window** method (``sma:n=5``, ``minus_sqrt:n=8``, ``ema:alpha=0.3,n=4``, any schedule with a window):
  each update merges the last n checkpoints of the run (on the method's ``every`` grid) with the schedule's
  coefficients: exactly the offline ``merge`` of that window.
- a **running EMA** (``ema:alpha=0.2``, ``ema:half_life=2000``: an EMA with no ``n`` covers every checkpoint
  seen). Its state is an fp32 safetensors folder on disk (``OUT/.state/<label>/``); each update merges the state
  and the new checkpoint with the schedule's two-point coefficients (``[beta, 1 - beta]``, beta from alpha or from
  the gap in steps / tokens) into the next state, and the same two inputs into ``OUT/<label>/``. One read of the
  new checkpoint and of the state per update, nothing held in RAM.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptmerge.errors import ConfigError
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.method_spec import MethodSpec
from ckptmerge.merging.offline import merge
from ckptmerge.merging.options import MergeOptions

DEFAULT_WINDOW = 5  # a window method given without n merges the last 5 checkpoints
STATE_DIR = ".state"


@dataclass(frozen=True)
class WatchMethod:
    """A parsed method and the folder name it is published under."""

    spec: MethodSpec

    @property
    def label(self) -> str:
        """``sma:n=5`` -> ``sma-n5``, ``ema:alpha=0.3`` -> ``ema-alpha0.3``: the folder under OUT and the name in
        metric keys (trackers such as MLflow allow no ``=`` in metric names)."""
        return str(self.spec).replace(":", "-").replace(",", "-").replace("=", "").replace("/", "_")

    @property
    def running(self) -> bool:
        return self.spec.name == "ema" and self.spec.n is None

    @property
    def window(self) -> int:
        """How many checkpoints the method merges (1 for a running EMA: only the newest is read)."""
        return 1 if self.running else self.spec.n or DEFAULT_WINDOW

    def series(self, history: Sequence[CheckpointRef]) -> list[CheckpointRef]:
        """The checkpoints this method merges: those on its ``every`` grid (step % every == 0), oldest first."""
        return [r for r in history if self.spec.every is None or r.step % self.spec.every == 0]

    def select(self, history: Sequence[CheckpointRef]) -> list[CheckpointRef]:
        """The window ending at the newest checkpoint of the method's series (empty when it has none)."""
        return self.series(history)[-self.window:]


def publish_window(method: WatchMethod, window: list[CheckpointRef], dest: Path, options: MergeOptions,
                   recipe: dict) -> None:
    """Merge ``window`` (readable paths) with the method's coefficients into ``dest``, replacing it atomically."""
    coeffs = method.spec.coeffs(window)
    merge(window, coeffs, dest, options, recipe=recipe, force=True, progress=False)


def update_running(method: WatchMethod, state: CheckpointRef | None, new: CheckpointRef, out: Path,
                   options: MergeOptions, recipe: dict) -> CheckpointRef:
    """One EMA step: the next state (fp32, on disk) and ``OUT/<label>/``; returns the new state's ref."""
    dest, next_state = out / method.label, _state_path(out, method, new.step)
    if state is None:  # the first checkpoint seeds the average (PMA's recursion): coefficients [1]
        inputs, coeffs = [new], [1.0]
    else:
        inputs = [state, new]
        coeffs = method.spec.coeffs([state, new])  # [beta, 1 - beta]: the EMA's decay over this gap
    out_dtype = options.out_dtype or float_dtype_of(new)
    merge(inputs, coeffs, next_state, dataclasses.replace(options, out_dtype="float32", as_checkpoint=False),
          recipe=recipe, force=True, progress=False)
    merge(inputs, coeffs, dest, dataclasses.replace(options, out_dtype=out_dtype), recipe=recipe, force=True,
          progress=False)
    return CheckpointRef(next_state, step=new.step, tokens_seen=new.tokens_seen)


def drop_states(out: Path, method: WatchMethod, keep: Path | None) -> None:
    """Remove the method's state folders other than ``keep`` (the one the watch state points to)."""
    folder = out / STATE_DIR / method.label
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if keep is None or entry.resolve() != Path(keep).resolve():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def float_dtype_of(ref: CheckpointRef) -> str:
    """The one float dtype of a checkpoint's tensors (the output's, when --out-dtype is not given)."""
    reader = open_checkpoint(ref.path)
    try:
        dtypes = {str(reader.info(k).dtype).removeprefix("torch.") for k in reader.keys() if reader.info(k).is_float}
    finally:
        reader.close()
    if len(dtypes) > 1:
        raise ConfigError(f"{ref.path}: float tensors of several dtypes ({', '.join(sorted(dtypes))}); a running EMA "
                          f"needs one output dtype: pass --out-dtype")
    return dtypes.pop() if dtypes else "float32"


def _state_path(out: Path, method: WatchMethod, step: int) -> Path:
    return out / STATE_DIR / method.label / f"step-{step:012d}"
