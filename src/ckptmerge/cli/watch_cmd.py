"""``ckptmerge watch RUN_DIR -o OUT``: a rolling merged model of a run, updated as checkpoints appear."""

from __future__ import annotations

import argparse

from ckptmerge.online.watch import WatchConfig, Watcher


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="keep a merged model of a training run up to date (sidecar)")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", required=True, help="folder for current/, watch.jsonl and the watch state")
    p.add_argument("--schedule", choices=("sma", "ema"), default="sma")
    p.add_argument("--last", type=int, default=5, help="sma: window length N (default 5)")
    p.add_argument("--every", type=int, help="only checkpoints with step %% V == 0")
    p.add_argument("--alpha", type=float, default=0.2, help="ema: weight of each new checkpoint (default 0.2)")
    p.add_argument("--eval", dest="eval_data", action="append", default=[], help="held-out data to log, repeatable")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--poll-s", type=float, default=30.0, help="seconds between scans (default 30)")
    p.add_argument("--settle-s", type=float, default=10.0, help="read a checkpoint only after its files are unchanged "
                                                                "this long (default 10)")
    p.add_argument("--recompute-every", type=int, default=8, help="sma: exact recompute every K updates (default 8)")
    p.add_argument("--tokens-per-step", type=int)
    p.add_argument("--once", action="store_true", help="process what is there now, then exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = WatchConfig(**{k: v for k, v in vars(args).items() if k in WatchConfig.__dataclass_fields__})
    Watcher(cfg).run(once=args.once)
    return 0
