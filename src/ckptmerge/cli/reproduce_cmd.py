"""``ckptmerge reproduce``: the LAWA, BO-merging and PMA claims at small scale, with computed verdicts."""

from __future__ import annotations

import argparse

from ckptmerge.reproduce.run import GROUPS, reproduce


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce the papers' claims (E1-E10) and write reports with verdicts")
    p.add_argument("group", choices=(*GROUPS, "all"), help="lawa (E1-E4), bo (E5), pma (E6-E10) or all")
    p.add_argument("--quick", action="store_true", help="tiny runs that check the pipeline in a few minutes")
    p.add_argument("--work", help="runs and the evaluation cache (default runs/reproduce[-quick])")
    p.add_argument("--reports", help="report folder (default reports/, or WORK/reports with --quick)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reproduce(args.group, quick=args.quick, work=args.work, reports=args.reports, progress=not args.quiet)
    return 0
