"""``ckptmerge clean PATH``: delete the temporary folders that killed runs left under PATH."""

from __future__ import annotations

import argparse
from pathlib import Path

from ckptmerge.cli.storage_flags import add_storage_flags
from ckptmerge.io.publish import clean_tree
from ckptmerge.io.remote import is_url


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="remove temporaries left by killed merges / training / watch runs",
                       description="Delete hidden .NAME.tmp-* / .NAME.old-* folders and files under PATH (and "
                                   "beside PATH, for PATH itself) whose owning process has exited. Temporaries of "
                                   "running processes and of other hosts are kept.")
    p.add_argument("path", help="an output folder, a run directory, or any folder above them (or a URL)")
    add_storage_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if is_url(args.path):  # an object store: killed uploads removed, or their commit finished
        from ckptmerge.io.remote import as_location
        from ckptmerge.io.remote_publish import clean_remote

        done = clean_remote(as_location(args.path))
        print("\n".join([*done, f"{len(done)} stale upload(s) handled under {args.path}"]))
        return 0
    removed = clean_tree(Path(args.path))
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} removed under {args.path}")
    return 0
