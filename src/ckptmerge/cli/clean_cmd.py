"""``ckptmerge clean PATH``: delete the temporary folders that killed runs left under PATH."""

from __future__ import annotations

import argparse
from pathlib import Path

from ckptmerge.io.publish import clean_tree


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="remove temporaries left by killed merges / training / watch runs",
                       description="Delete hidden .NAME.tmp-* / .NAME.old-* folders and files under PATH (and "
                                   "beside PATH, for PATH itself) whose owning process has exited. Temporaries of "
                                   "running processes and of other hosts are kept.")
    p.add_argument("path", help="an output folder, a run directory, or any folder above them")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    removed = clean_tree(Path(args.path))
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} removed under {args.path}")
    return 0
