"""``ckptmerge data prepare``: download the pinned corpora and build the token files."""

from __future__ import annotations

import argparse

from ckptmerge.console import print_table
from ckptmerge.data.corpora import DOMAINS, cache_dir
from ckptmerge.data.tokens import prepare


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare corpora (also done automatically on first use)")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("domains", nargs="*", help=f"default: all ({', '.join(DOMAINS)})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print_table(["domain", "tokens"], [[name, f"{count:,}"] for name, count in prepare(args.domains or None).items()])
    print(f"cache: {cache_dir()}")
    return 0
