"""``ckptmerge sweep``: raw checkpoints and merges along a run, with an annealing prediction."""

from __future__ import annotations

import argparse
from pathlib import Path

from ckptmerge.cli.deprecated import add_deprecated, add_renamed
from ckptmerge.cli.eval_flags import add_eval_flags, settings_from_args
from ckptmerge.cli.storage_flags import add_storage_flags
from ckptmerge.io.remote import refuse_urls
from ckptmerge.search.storage import DEFAULT_HEARTBEAT_S


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="evaluate raw checkpoints and merges (methods x N x V) along a run")
    p.add_argument("run_dir", help="a run directory of checkpoints (ckptmerge, HF Trainer, Megatron, ...)")
    p.add_argument("--data", action="append", help="held-out data: domain, text file or token .bin; repeatable "
                                                   "(the first is the headline; default shakespeare-val)")
    p.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help="a merge method, repeatable: sma, wma, ema:alpha=0.2, ema:half_life=2000, minus_sqrt, ... "
                        "(docs/cli.md; default sma, wma, ema:alpha=0.2); over power-EMA snapshots (RUN/phema) the "
                        "post-hoc EMA widths, phema:sigma_rel=0.05/0.07/0.10 (docs/posthoc-ema.md)")
    add_deprecated(p, "--methods", "--method SPEC (repeatable)", dest="methods_list", metavar="LIST")
    p.add_argument("--last", type=_ints, default=[3, 5, 10], help="window sizes N, comma list (default 3,5,10)")
    add_renamed(p, "--n", "--last")
    p.add_argument("--every", type=_ints, default=[], help="spacings V in steps, comma list "
                                                         "(default: the save interval and twice it)")
    p.add_argument("--at", type=_ints, default=[], help="evaluation points (steps), comma list")
    p.add_argument("--points", type=int, default=8, help="without --at: this many points spread evenly (default 8)")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens per evaluation")
    p.add_argument("--anneal", action="append", default=[],
                   help="an anneal branch run dir, repeatable (default: sibling runs forked from RUN_DIR)")
    p.add_argument("-o", "--output", help="report folder (default: RUN_DIR-sweep next to the run)")
    add_renamed(p, "--out", "--output")
    p.add_argument("--objective", choices=("loss", "bits_per_byte"), default="loss",
                   help="rank and report merges in nats/token (loss, default) or bits per byte")
    add_renamed(p, "--metric", "--objective")
    p.add_argument("--storage", help="share the evaluations with other workers through an Optuna storage: "
                   "postgresql://user@host/db, mysql+pymysql://..., sqlite:///sweep.db or journal:///shared/sweep.log; "
                   "every worker runs the same command (docs/scale.md)")
    p.add_argument("--study", default="ckptmerge-sweep", help="study name in the storage (one per sweep)")
    p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S,
                   help="seconds between a running evaluation's heartbeats on a database; one silent for 3x this "
                        "is failed and re-queued (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_eval_flags(p)
    add_storage_flags(p)  # for --data / --tokenizer URLs
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the library loads here, not when the CLI starts (ckptmerge --help imports no torch)
    from ckptmerge.sweep.run import SweepConfig, sweep

    refuse_urls("sweep", "--data and --tokenizer take URLs; copy the run to a local folder to sweep it "
                "(`ckptmerge merge URL` and `ckptmerge eval URL` read runs at URLs)", run_dir=args.run_dir,
                **{"-o": args.output, "--anneal": args.anneal})
    run_dir = Path(args.run_dir)
    cfg = SweepConfig(methods=_methods(args), n=args.last, every=args.every, at=args.at,
                      points=args.points, data=args.data or ["shakespeare-val"], n_tokens=args.tokens,
                      anneal=args.anneal, objective=args.objective, storage=args.storage, study=args.study,
                      heartbeat_s=args.heartbeat)
    out = Path(args.output) if args.output else run_dir.resolve().parent / f"{run_dir.resolve().name}-sweep"
    sweep(run_dir, cfg, out, progress=not args.quiet, settings=settings_from_args(args, progress=not args.quiet))
    return 0


def _methods(args: argparse.Namespace) -> list[str]:
    """``--method`` specs and the old ``--methods a,b,c`` list, in order (both: the old list first)."""
    # the library loads here, not when the CLI starts (ckptmerge --help imports no torch)
    from ckptmerge.sweep.run import SweepConfig

    old = [m for m in (getattr(args, "methods_list", None) or "").split(",") if m]
    return [*old, *args.method] or SweepConfig().methods
