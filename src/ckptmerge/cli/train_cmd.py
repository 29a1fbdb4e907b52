"""``ckptmerge train``: train, resume, or fork a tiny-LM run that writes an HF checkpoint series."""

from __future__ import annotations

import argparse
import warnings
from dataclasses import asdict, fields

from ckptmerge.cli.deprecated import add_renamed
from ckptmerge.errors import ConfigError
from ckptmerge.io.yaml_config import read_yaml
from ckptmerge.train.config import TrainConfig, config_from_dict  # torch-free: the flags come from it

_HELP = {
    "preset": "model preset: tiny (~0.8M), small (~3M), base (~10M), pythia-tiny",
    "steps": "total optimizer steps (a fork counts from its parent's step)",
    "lr": "peak learning rate", "schedule": "learning-rate schedule: constant | cosine | wsd",
    "warmup_steps": "linear warm-up steps", "decay_steps": "wsd: length of the decay (overrides --decay-fraction)",
    "decay_fraction": "wsd: decay over this fraction of --max-steps", "decay_shape": "wsd decay: linear | cosine | 1-sqrt",
    "min_lr_ratio": "final LR as a fraction of the peak", "batch_size": "sequences per micro-batch",
    "context": "tokens per sequence (default: the preset's)", "grad_accum": "micro-batches per optimizer step",
    "save_every": "checkpoint every K steps", "seed": "seed for initialization and batches",
    "data": "training data: a domain name, a text file or a token .bin", "eval_every": "held-out eval every K steps (0: off)",
    "eval_data": "held-out data for --eval-every", "eval_tokens": "tokens per held-out eval",
    "log_every": "metrics line every K steps",
    "keep_trainer_state": "keep optimizer / RNG state only in the newest K checkpoints (0: all; forks need it)",
    "optimizer_state": "fork / init-from: keep | reset the optimizer state of the --fork-from checkpoint",
    "init_from": "PMA-init: start from these merged weights (with --fork-from: its step and optimizer state)",
    "average": "online average kept during training, repeatable: ema:half_life=500, swa:start_step=1000, "
               "lawa:n=5,every=200, pma:schedule=wma,n=8,every=100",
}
# TrainConfig field -> its name on the command line and in YAML (one name per idea across subcommands);
# the field's own name stays accepted for a release, with a notice
PUBLIC_NAMES = {"steps": "max_steps", "schedule": "lr_schedule", "data": "train_data"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a tiny LM and save a checkpoint series (HF folders)")
    p.add_argument("-o", "--output", help="run directory")
    p.add_argument("--config", help="YAML file with the options below (snake_case keys)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    p.add_argument("--fork-from", metavar="CKPT", help="start a new branch from this checkpoint (weights + optimizer)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in fields(TrainConfig):
        if f.name == "fork_from":
            continue
        public = PUBLIC_NAMES.get(f.name, f.name)
        flag, metavar = _flag(public), public.upper()
        if str(f.type).startswith("list"):
            p.add_argument(flag, dest=f.name, action="append", metavar=metavar, help=_HELP.get(f.name))
        else:
            kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
            p.add_argument(flag, dest=f.name, type=kind, metavar=metavar, help=_HELP.get(f.name))
        if f.name in PUBLIC_NAMES:
            add_renamed(p, _flag(f.name), flag)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the library loads here, not when the CLI starts (ckptmerge --help imports no torch)
    from ckptmerge.train.trainer import train

    if args.resume:
        train(TrainConfig(), args.resume, resume=True, progress=not args.quiet)
        print(f"resumed and finished {args.resume}")
        return 0
    if not args.output:
        raise ConfigError("give -o RUN_DIR (or --resume RUN_DIR)")
    data = _from_public_names(read_yaml(args.config), args.config) if args.config else {}
    data = {**asdict(TrainConfig()), **data}
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    config = config_from_dict(data, args.config or "command line")
    train(config, args.output, progress=not args.quiet)
    print(f"trained {args.output}: {config.steps} steps, checkpoints every {config.save_every}")
    return 0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _from_public_names(data: dict, path: str) -> dict:
    """YAML keys as written (``max_steps``) -> TrainConfig fields (``steps``); old keys warn for a release."""
    out = dict(data)
    for field_name, public in PUBLIC_NAMES.items():
        if field_name in out and public in out:
            raise ConfigError(f"{path}: give {public}, not both {public} and its old name {field_name}")
        if field_name in out:
            warnings.warn(f"{path}: key {field_name} is deprecated; use {public}", DeprecationWarning, stacklevel=2)
        elif public in out:
            out[field_name] = out.pop(public)
    return out
