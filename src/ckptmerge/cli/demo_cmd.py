"""``ckptmerge demo``: train, fork, merge, evaluate and report (see ckptmerge.demo.run)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ckptmerge.cli.deprecated import add_renamed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="what merging gives a real tiny pre-training run (table + plot)")
    p.add_argument("-o", "--output", help="folder for runs, merges and the report (default runs/demo, runs/demo-quick)")
    add_renamed(p, "--out", "--output")
    p.add_argument("--quick", action="store_true", help="a short smoke version (about a minute)")
    p.add_argument("--train-data", help="training data (default: shakespeare)")
    p.add_argument("--data", action="append", help="held-out data, repeatable (first is in-domain)")
    add_renamed(p, "--eval-data", "--data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the library loads here, not when the CLI starts (ckptmerge --help imports no torch)
    from ckptmerge.demo.run import DemoConfig, run_demo

    overrides = {"out": args.output} if args.output else {}
    if args.train_data:
        overrides["data"] = args.train_data
    if args.data:
        overrides["eval_data"] = args.data
        if not args.train_data:  # before this release, demo --data named the training corpus
            warnings.warn(f"demo --data now names held-out data ({', '.join(args.data)}); the training corpus is "
                          f"--train-data (default shakespeare)", UserWarning, stacklevel=1)
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(cfg, progress=not args.quiet)
    report = Path(cfg.out) / "report.md"
    print(report.read_text())
    print(f"report: {report}\nplot:   {Path(cfg.out) / 'loss_vs_step.png'}")
    return 0
