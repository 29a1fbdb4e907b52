"""``ckptmerge reproduce``: the LAWA, BO-merging and PMA claims at small scale, with computed outcomes."""

from __future__ import annotations

import argparse
import sys

from ckptmerge.cli.deprecated import add_renamed

from ckptmerge.reproduce.scale import GROUPS, SCALES, make_scale


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce the papers' claims (E1-E9, E11) with seeds, CIs and outcomes")
    p.add_argument("group", choices=(*GROUPS, "all"), help="lawa (E1-E4), bo (E5), pma (E6-E9, E11) or all")
    p.add_argument("--quick", action="store_true", help="the same code at ~1/10 of the steps (3 seeds; 14 min on 2 shared cores)")
    p.add_argument("--scale", choices=list(SCALES), help="full, quick or test (CI); --quick is --scale quick")
    p.add_argument("--seeds", type=int, nargs="+", help="at least 3 seeds (default 0 1 2)")
    p.add_argument("--train-data", help="training corpus (default shakespeare)")
    p.add_argument("--data", help="held-out set the claims are scored on (default shakespeare-val)")
    add_renamed(p, "--eval-data", "--data")
    p.add_argument("--preset", help="model preset (default tiny)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 16, quick 8)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant", "wsd"),
                   help="the LAWA runs' learning-rate schedule (default cosine)")
    add_renamed(p, "--schedule", "--lr-schedule")
    p.add_argument("--workers", type=int, default=2, help="runs trained at a time (default 2)")
    p.add_argument("--work", help="runs folder, resumable (default runs/reproduce[-SCALE])")
    p.add_argument("--reports", help="report folder (default reports/ at full scale, else WORK/reports)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ckptmerge.reproduce.run import reproduce  # SciPy and the trainer: not for the other commands' start-up

    name = args.scale or ("quick" if args.quick else "full")
    scale = make_scale(name, seeds=args.seeds, train_data=args.train_data, eval_data=args.data,
                       preset=args.preset, batch_size=args.batch_size, schedule=args.lr_schedule)
    work = args.work or ("runs/reproduce" if name == "full" else f"runs/reproduce-{name}")
    reports = args.reports or ("reports" if name == "full" else f"{work}/reports")
    command = "ckptmerge " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else f"ckptmerge reproduce {args.group}"
    reproduce(args.group, scale=scale, work=work, reports=reports, workers=args.workers, command=command)
    return 0
