"""``ckptmerge watch RUN_DIR -o OUT``: a rolling merged model of a run, updated as checkpoints appear.

``OUT`` may be a URL (``-o s3://bucket/out``): the watch works in ``--work-dir`` and publishes each rewritten
``<method>/`` there by the commit protocol (online/watch_publish.py)."""

from __future__ import annotations

import argparse

from dataclasses import replace

from ckptmerge.cli.deprecated import add_deprecated, add_renamed
from ckptmerge.cli.eval_flags import add_eval_flags, settings_from_args
from ckptmerge.cli.merge_flags import add_output_flags, options_from_args
from ckptmerge.cli.storage_flags import add_storage_flags
from ckptmerge.errors import ConfigError

# The MergeOptions flags of watch (its --device is the evaluation's and the merges'; it always replaces its own
# folders, so --force is not one of them).
WATCH_OUTPUT_FLAGS = ("out_dtype", "accum_dtype", "max_shard_size", "chunk_size", "direct_io", "allow_nonfinite",
                      "hash", "as_checkpoint")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="keep merged models of a training run up to date and log them (sidecar)",
                       description="Follow a run: after each new checkpoint, every --method's OUT/<method>/ is "
                                   "rewritten (equal to the offline merge of its window), the raw checkpoint and "
                                   "every merge are evaluated on --data, and the numbers go to --log trackers.")
    p.add_argument("run_dir", help="the run's folder, or its URL (s3://bucket/run: listed once per poll, read by "
                                   "range requests)")
    p.add_argument("-o", "--output", required=True,
                   help="folder for OUT/<method>/, watch.jsonl, report.html and the watch state; or a URL "
                        "(s3://bucket/out: OUT/<method>/ published by the commit protocol, the state in --work-dir)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="with an -o URL: the local folder of the watch state, running EMA states, retained checkpoints "
                        "and trackers' files (default $CKPTMERGE_CACHE/watch/<hash of the URL>, printed at start); "
                        "give the same one to resume")
    p.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help="a merge method in the method language, repeatable: sma:n=5, ema:alpha=0.2, "
                        "ema:half_life=2000, minus_sqrt:n=8, ... (default sma:n=5; docs/online.md)")
    p.add_argument("--last", type=int, help="window length N of methods given without n (default 5)")
    p.add_argument("--every", type=int, help="only checkpoints with step %% V == 0")
    add_deprecated(p, "--schedule", "--method sma or --method ema:alpha=A", dest="old_schedule", choices=("sma", "ema"))
    add_deprecated(p, "--alpha", "--method ema:alpha=A", dest="old_alpha", type=float)
    add_deprecated(p, "--recompute-every", "nothing (every update is an exact merge)", dest="old_recompute", type=int)
    p.add_argument("--data", action="append", default=[], help="held-out data to evaluate after each update, repeatable")
    add_renamed(p, "--eval", "--data")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens per data set (default 16384)")
    add_renamed(p, "--eval-tokens", "--tokens")
    p.add_argument("--log", action="append", default=[], metavar="TRACKER",
                   help="tensorboard:DIR, mlflow[:URI] (default sqlite:///OUT/mlflow.db) or wandb[:PROJECT], repeatable "
                        "(each an optional extra)")
    p.add_argument("--wandb-run-id", help="attach W&B logging to this run (default: $WANDB_RUN_ID, else a new run)")
    p.add_argument("--poll-s", type=float, default=30.0, help="seconds between scans (default 30)")
    p.add_argument("--settle-s", type=float, default=10.0, help="read a checkpoint only after its files are unchanged "
                                                                "this long (at a URL: their ETags and sizes; "
                                                                "default 10)")
    p.add_argument("--tokens-per-step", type=int)
    p.add_argument("--once", action="store_true", help="process what is there now, then exit (cron)")
    p.add_argument("--report", action="store_true",
                   help="draw OUT/report.png and OUT/report.html (loss vs step, raw and every method) and exit; "
                        "for an -o URL, drawn in --work-dir and uploaded")
    add_output_flags(p.add_argument_group("output of OUT/<method>/ (as in merge)"), WATCH_OUTPUT_FLAGS,
                     old_spellings=False)
    add_eval_flags(p)
    add_storage_flags(p)  # for a run and an -o at URLs
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.report:
        from ckptmerge.online.watch_report import report

        for line in report(args.output, args.work_dir):
            print(line)
        return 0
    from ckptmerge.online.watch import Watcher, watch_config  # torch: only this command's start-up

    options = options_from_args(args, WATCH_OUTPUT_FLAGS)
    if args.device not in (None, "auto"):
        options = replace(options, device=args.device)  # one --device: where merges and evaluation run
    config = watch_config(args.run_dir, args.output, methods_from_args(args), every=args.every, data=args.data,
                          tokens=args.tokens, poll_s=args.poll_s, settle_s=args.settle_s,
                          tokens_per_step=args.tokens_per_step, options=options, log=args.log,
                          wandb_run_id=args.wandb_run_id, eval_settings=settings_from_args(args, progress=False),
                          work_dir=args.work_dir)
    Watcher(config).run(once=args.once)
    return 0


def methods_from_args(args: argparse.Namespace) -> list:
    """Every ``--method`` (or the old ``--schedule`` / ``--alpha``), with ``--last`` as the n of window methods
    given without one. A running EMA (``ema`` without n) covers every checkpoint and takes no ``--last``."""
    from ckptmerge.merging.method_spec import parse_method

    old = args.old_schedule is not None or args.old_alpha is not None
    if args.method and old:
        raise ConfigError("give --method alone, without the old --schedule / --alpha")
    specs = [parse_method(text) for text in (args.method or [_old_text(args)])]
    if args.last is None:
        return specs
    if all(s.name == "ema" and s.n is None for s in specs):
        raise ConfigError(f"--last {args.last}: an ema method runs over every checkpoint seen; for a window EMA "
                          f"write ema:alpha=A,n={args.last}")
    clashes = [str(s) for s in specs if s.n is not None and s.n != args.last]
    if clashes:
        raise ConfigError(f"--last {args.last} disagrees with n in --method {', '.join(clashes)}; give n once")
    return [s if s.n is not None or s.name == "ema" else replace(s, n=args.last) for s in specs]


def _old_text(args: argparse.Namespace) -> str:
    schedule = args.old_schedule or ("ema" if args.old_alpha is not None else "sma")
    if schedule == "sma" and args.old_alpha is not None:
        raise ConfigError("--alpha is the EMA weight; sma takes none (give --method ema:alpha=A)")
    if schedule == "ema":
        return f"ema:alpha={args.old_alpha if args.old_alpha is not None else 0.2}"
    return "sma"
