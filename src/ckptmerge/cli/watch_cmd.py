"""``ckptmerge watch RUN_DIR -o OUT``: a rolling merged model of a run, updated as checkpoints appear."""

from __future__ import annotations

import argparse

from ckptmerge.cli.deprecated import add_deprecated, add_renamed
from ckptmerge.cli.merge_flags import add_output_flags, options_from_args
from ckptmerge.errors import ConfigError

# The MergeOptions watch honours for current/ (it merges in memory on the CPU and writes no merge.json).
WATCH_OUTPUT_FLAGS = ("out_dtype", "accum_dtype", "max_shard_size", "direct_io", "allow_nonfinite", "as_checkpoint")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="keep a merged model of a training run up to date (sidecar)")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", required=True, help="folder for current/, watch.jsonl and the watch state")
    p.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help="sma[:n=N,every=V] (default, n 5) or ema:alpha=A[,every=V] (docs/cli.md)")
    p.add_argument("--last", type=int, help="sma: window length N (the same as sma:n=N; default 5)")
    p.add_argument("--every", type=int, help="only checkpoints with step %% V == 0 (the same as every=V)")
    add_deprecated(p, "--schedule", "--method sma or --method ema:alpha=A", dest="old_schedule", choices=("sma", "ema"))
    add_deprecated(p, "--alpha", "--method ema:alpha=A", dest="old_alpha", type=float)
    p.add_argument("--data", action="append", default=[], help="held-out data to log, repeatable")
    add_renamed(p, "--eval", "--data")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens per data set (default 16384)")
    add_renamed(p, "--eval-tokens", "--tokens")
    p.add_argument("--poll-s", type=float, default=30.0, help="seconds between scans (default 30)")
    p.add_argument("--settle-s", type=float, default=10.0, help="read a checkpoint only after its files are unchanged "
                                                                "this long (default 10)")
    p.add_argument("--recompute-every", type=int, default=8, help="sma: exact recompute every K updates (default 8)")
    p.add_argument("--tokens-per-step", type=int)
    p.add_argument("--once", action="store_true", help="process what is there now, then exit")
    add_output_flags(p.add_argument_group("output of current/ (as in merge)"), WATCH_OUTPUT_FLAGS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ckptmerge.online.watch import Watcher, watch_config  # torch: only this command's start-up

    options = {k: getattr(args, k) for k in ("data", "tokens", "poll_s", "settle_s", "recompute_every",
                                             "tokens_per_step")}
    options["options"] = options_from_args(args, WATCH_OUTPUT_FLAGS)
    Watcher(watch_config(args.run_dir, args.output, method_from_args(args), **options)).run(once=args.once)
    return 0


def method_from_args(args: argparse.Namespace):
    """One ``--method`` (or the old ``--schedule`` / ``--alpha``), with ``--last`` / ``--every`` folded in."""
    from dataclasses import replace

    from ckptmerge.merging.method_spec import parse_method

    old = args.old_schedule is not None or args.old_alpha is not None
    if len(args.method) > 1:
        raise ConfigError(f"watch keeps one merge; give one --method, not {len(args.method)} ({', '.join(args.method)})")
    if args.method and old:
        raise ConfigError("give --method alone, without the old --schedule / --alpha")
    spec = parse_method(args.method[0] if args.method else _old_text(args))
    for key, flag in (("n", "--last"), ("every", "--every")):
        given = getattr(args, "last" if key == "n" else "every")
        if given is not None and getattr(spec, key) not in (None, given):
            raise ConfigError(f"{flag} {given} disagrees with {key}={getattr(spec, key)} in --method {spec}")
        if given is not None:
            spec = replace(spec, **{key: given})
    return spec


def _old_text(args: argparse.Namespace) -> str:
    schedule = args.old_schedule or ("ema" if args.old_alpha is not None else "sma")
    if schedule == "sma" and args.old_alpha is not None:
        raise ConfigError("--alpha is the EMA weight; sma takes none (give --method ema:alpha=A)")
    if schedule == "ema":
        return f"ema:alpha={args.old_alpha if args.old_alpha is not None else 0.2}"
    return "sma"
