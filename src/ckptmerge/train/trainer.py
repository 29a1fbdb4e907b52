"""The training loop: AdamW, gradient clipping and accumulation, fixed seeds, checkpoints every K steps.

    ckptmerge train --preset tiny --steps 2000 --lr 3e-3 --schedule constant --save-every 100 -o runs/a
    ckptmerge train --resume runs/a                     # continue the identical trajectory
    ckptmerge train --fork-from runs/a/step-001600 --schedule wsd --steps 2000 --decay-steps 400 -o runs/a-anneal
    ckptmerge train --average ema:half_life=200 --average lawa:n=5,every=100 ...   # online averages
    ckptmerge train --average phema:sigma_rel=0.05/0.10,every=100 ...   # power-EMA snapshots in RUN/phema/
    ckptmerge train --fork-from runs/a/step-001600 --init-from out/sma --optimizer-state reset -o runs/a-pma-init

Batches are a pure function of (seed, step), so resuming reproduces the same losses.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ckptmerge.console import progress_bar
from ckptmerge.data.batches import eval_windows
from ckptmerge.data.tokens import load_tokens
from ckptmerge.errors import ConfigError
from ckptmerge.evaluation.evaluator import evaluate_model
from ckptmerge.io.publish import atomic_folder, remove_stale, write_text_atomic
from ckptmerge.io.remote import refuse_urls
from ckptmerge.online.spec import parse_average_spec
from ckptmerge.train.checkpointing import (
    checkpoint_name,
    latest_resumable,
    load_trainer_state,
    prune_trainer_states,
    read_meta,
    save_checkpoint,
)
from ckptmerge.train.config import TrainConfig, config_from_dict
from ckptmerge.train.init_from import init_from_merged
from ckptmerge.train.loop import TrainState, clip_gradients, make_optimizer, run_steps
from ckptmerge.train.presets import build_model

RUN_CONFIG = "run.json"
METRICS = "metrics.jsonl"
__all__ = ["TrainConfig", "averager_names", "clip_gradients", "config_from_dict", "make_optimizer", "read_run_config",
           "train", "train_or_resume"]


def averager_names(specs: list[str]) -> list[str]:
    """``avg-ema``, ``avg-lawa``, ``avg-ema-2``, ...: one folder name per --average spec."""
    names, seen = [], {}
    for spec in specs:
        kind = spec.partition(":")[0]
        seen[kind] = seen.get(kind, 0) + 1
        names.append(f"avg-{kind}" + (f"-{seen[kind]}" if seen[kind] > 1 else ""))
    return names


def train(config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) a run in ``run_dir``; returns the run directory."""
    refuse_urls("train", "the run, its data and --fork-from / --init-from are local paths; a merge at a URL can be "
                "copied to a local folder first", run_dir=run_dir, fork_from=config.fork_from,
                init_from=config.init_from, train_data=config.data, eval_data=config.eval_data)
    run_dir = Path(run_dir)
    if resume:
        config = config_from_dict(read_run_config(run_dir), str(run_dir / RUN_CONFIG))
    elif (run_dir / RUN_CONFIG).exists():
        raise ConfigError(f"{run_dir}: already holds a run; use --resume to continue it or choose a new -o")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress line covers the run
    tokens = load_tokens(config.data)
    remove_stale(run_dir)  # temporaries of a killed earlier run of this directory
    state = _resume_state(config, run_dir) if resume else _fresh_state(config, run_dir)
    tokenizer_dir = _tokenizer_dir(run_dir)
    _loop(config, run_dir, state, tokens, tokenizer_dir, progress)
    return run_dir


def train_or_resume(config: TrainConfig, run_dir: str | Path, *, progress: bool = True) -> Path:
    """Train a new run, or continue (or just reuse) the one in ``run_dir`` if it was started with ``config``."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).exists():
        return train(config, run_dir, progress=progress)
    if asdict(config_from_dict(read_run_config(run_dir), str(run_dir / RUN_CONFIG))) != asdict(config):
        raise ConfigError(f"{run_dir} holds a run with other settings; remove it or choose another output folder")
    return train(config, run_dir, resume=True, progress=progress)


def read_run_config(run_dir: Path) -> dict:
    """The settings a run was started with (``RUN/run.json``); ConfigError when absent or unreadable."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {RUN_CONFIG} here, so it is not a run ckptmerge train started; "
                          f"check the path, or start a new run with -o {run_dir}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({str(exc)[:200]}); restore it or start a new run") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object of settings; restore it or start a new run")
    return data


def _initial_state(config: TrainConfig) -> TrainState:
    """A new model (seeded), or the fork parent's weights and (policy permitting) optimizer state."""
    model = build_model(config.preset, config.seed)
    optimizer = make_optimizer(model, config)
    averagers = dict(zip(averager_names(config.average), map(parse_average_spec, config.average)))
    step, parent = 0, None
    if config.fork_from:
        parent_dir = Path(config.fork_from)
        init_from_merged(model, parent_dir)  # weights only; the parent's optimizer state follows
        trainer_state = load_trainer_state(parent_dir)
        if trainer_state is not None:
            optimizer.load_state_dict(trainer_state["optimizer"])
        step, parent = read_meta(parent_dir)["step"], str(parent_dir.resolve())
    if config.init_from:  # PMA-init: merged weights, optimizer state of the fork parent kept or reset
        init_from_merged(model, config.init_from, optimizer, config.optimizer_state)
        if not config.fork_from:
            step = _meta_step(Path(config.init_from))
    elif config.optimizer_state == "reset":
        optimizer.state.clear()
    return TrainState(model, optimizer, step, parent, averagers)


def _meta_step(folder: Path) -> int:
    if not (folder / "ckptmerge.json").is_file():
        return 0
    return read_meta(folder).get("step") or 0


def _fresh_state(config: TrainConfig, run_dir: Path) -> TrainState:
    state = _initial_state(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RUN_CONFIG, json.dumps(asdict(config), indent=2) + "\n")
    write_text_atomic(run_dir / METRICS, "")
    return state


def _resume_state(config: TrainConfig, run_dir: Path) -> TrainState:
    latest = latest_resumable(run_dir)
    if latest is None:  # killed before the first checkpoint: start over, from the parent for a fork
        write_text_atomic(run_dir / METRICS, "")
        return _initial_state(config)
    state = _initial_state(config)
    init_from_merged(state.model, latest)
    trainer_state = load_trainer_state(latest)
    state.optimizer.load_state_dict(trainer_state["optimizer"])
    torch.set_rng_state(trainer_state["torch_rng"])
    for name, averager in state.averagers.items():
        if name in trainer_state.get("averagers", {}):  # absent when it had not updated yet
            averager.load_state_dict(trainer_state["averagers"][name])
    meta = read_meta(latest)
    _truncate_metrics(run_dir / METRICS, meta["step"])
    return TrainState(state.model, state.optimizer, meta["step"], meta.get("parent"), state.averagers)


def _tokenizer_dir(run_dir: Path) -> Path:
    folder = run_dir / ".tokenizer"
    if not (folder / "tokenizer.json").is_file():
        from ckptmerge.data.tokenizer import save_hf_tokenizer

        with atomic_folder(folder, force=True) as tmp:
            save_hf_tokenizer(tmp)
    return folder


def _truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if _metrics_step(line) <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _metrics_step(line: str) -> float:
    """The step of one metrics line; a line cut short by a kill counts as after every step (dropped)."""
    try:
        record = json.loads(line)
    except ValueError:
        return float("inf")
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else float("inf")


def _loop(config: TrainConfig, run_dir: Path, state: TrainState, tokens, tokenizer_dir: Path, progress: bool) -> None:
    windows = (eval_windows(load_tokens(config.eval_data), n_tokens=config.eval_tokens, context=config.seq_len)
               if config.eval_every else None)
    bar = progress_bar(config.steps - state.step, "train", unit="step", enabled=progress)
    started, start_step = time.monotonic(), state.step
    board = _tensorboard(run_dir)

    def after_step(state: TrainState, record: dict) -> bool:
        if windows is not None and state.step % config.eval_every == 0:
            record.update(_held_out(state, windows))
        if state.step % config.log_every == 0 or "val_loss" in record or state.step == config.steps:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if board is not None:
                for key, value in record.items():
                    if key in ("loss", "lr", "grad_norm") or key.startswith("val_loss"):
                        board.add_scalar(key, value, state.step)
        if state.step % config.save_every == 0 or state.step == config.steps:
            _save(run_dir, config, state, record, tokenizer_dir)
        _save_snapshots(run_dir, state, tokenizer_dir)
        tokens_per_s = (state.step - start_step) * config.tokens_per_step / (time.monotonic() - started)
        bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.2e} {tokens_per_s / 1000:.1f}k tokens/s",
                            refresh=False)
        bar.update(1)
        return False

    with open(run_dir / METRICS, "a") as metrics:
        run_steps(config, state, tokens, [after_step])
    bar.close()
    if board is not None:
        board.close()


def _held_out(state: TrainState, windows) -> dict[str, float]:
    """Held-out loss of the training weights and of each average (swapped in, then swapped back)."""
    losses = {"val_loss": evaluate_model(state.model, windows).loss}
    for name, averager in state.averagers.items():
        if averager.n_averaged:
            with averager.swapped(state.model):
                losses[f"val_loss_{name}"] = evaluate_model(state.model, windows).loss
    return losses


def _tensorboard(run_dir: Path):
    """A TensorBoard writer when the ``tensorboard`` package is installed, else None (JSONL only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _save_snapshots(run_dir: Path, state: TrainState, tokenizer_dir: Path) -> None:
    """Power-EMA snapshots (``--average phema:...,every=K``) into ``RUN/phema/`` (``RUN/phema-2/`` for a second)."""
    for name, averager in state.averagers.items():
        if hasattr(averager, "snapshot_due") and averager.snapshot_due(state.step):
            for folder in averager.save_snapshots(run_dir / name.removeprefix("avg-"), state.model,
                                                  extra_meta={"parent": state.parent}):
                for file in tokenizer_dir.iterdir():
                    shutil.copyfile(file, folder / file.name)


def _save(run_dir: Path, config: TrainConfig, state: TrainState, record: dict, tokenizer_dir: Path) -> None:
    meta = {"step": state.step, "tokens_seen": record["tokens_seen"], "lr": record["lr"], "train_loss": record["loss"],
            "grad_norm": record["grad_norm"], "seed": config.seed, "data": config.data,
            "data_position": {"step": state.step, "micro_batches": state.step * config.grad_accum},
            "schedule": config.schedule, "parent": state.parent, "init_from": config.init_from}
    save_checkpoint(run_dir / checkpoint_name(state.step), state.model, state.optimizer, meta, tokenizer_dir,
                    averagers=state.averagers)
    if config.keep_trainer_state:
        prune_trainer_states(run_dir, keep=config.keep_trainer_state)
