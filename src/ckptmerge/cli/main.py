"""``ckptmerge`` command line: one subcommand module each, every body one library call."""

from __future__ import annotations

import argparse
import sys
import warnings

from ckptmerge.cli import (
    data_cmd,
    demo_cmd,
    eval_cmd,
    inspect_cmd,
    merge_cmd,
    recover_cmd,
    reproduce_cmd,
    search_cmd,
    sweep_cmd,
    train_cmd,
    watch_cmd,
)
from ckptmerge.errors import CkptMergeError

COMMANDS = (inspect_cmd, merge_cmd, train_cmd, eval_cmd, data_cmd, demo_cmd, watch_cmd, search_cmd, sweep_cmd, recover_cmd,
            reproduce_cmd)


def build_parser() -> argparse.ArgumentParser:
    from ckptmerge import __version__

    parser = argparse.ArgumentParser(prog="ckptmerge", description="Checkpoint merging for LLM pre-training.")
    parser.add_argument("--version", action="version", version=f"ckptmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"ckptmerge: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the caller's warning display on exit
            warnings.showwarning = _show_warning
            return args.run(args) or 0
    except CkptMergeError as exc:
        if not getattr(exc, "quiet", False):  # quiet: another rank of a torchrun job printed it
            print(f"ckptmerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ckptmerge {args.command}: interrupted; nothing was published", file=sys.stderr)
        return 130
