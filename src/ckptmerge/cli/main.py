"""``ckptmerge`` command line: one subcommand module each, every body one library call."""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings

from ckptmerge.cli import (
    clean_cmd,
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
from ckptmerge.cli.storage_flags import apply_storage_flags
from ckptmerge.errors import CkptMergeError

COMMANDS = (inspect_cmd, merge_cmd, train_cmd, eval_cmd, data_cmd, demo_cmd, watch_cmd, search_cmd, sweep_cmd, recover_cmd,
            reproduce_cmd, clean_cmd)


def build_parser() -> argparse.ArgumentParser:
    from ckptmerge import __version__

    parser = argparse.ArgumentParser(prog="ckptmerge", description="Checkpoint merging for LLM pre-training.")
    parser.add_argument("--version", action="version", version=f"ckptmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"ckptmerge: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the subcommand
    with warnings.catch_warnings():  # restores the caller's warning display on exit
        warnings.showwarning = _show_warning
        # old spellings (cli/deprecated.py, method and averager keywords): one line each, once per run
        warnings.filterwarnings("default", category=DeprecationWarning, module="ckptmerge")
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
        args.debug = debug
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        apply_storage_flags(args)  # --storage-options / --io-concurrency, for the commands that take URLs
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"ckptmerge {args.command}: interrupted; nothing was published", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure ends as one line (the traceback only with --debug)
        if args.debug:
            traceback.print_exc()
        if getattr(exc, "quiet", False):  # another rank of a torchrun job printed it
            return 2
        print(f"ckptmerge {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (CkptMergeError, OSError)) else 1


def describe_error(exc: BaseException, max_chars: int = 2000) -> str:
    """One line for any exception: ours as written, an OSError with its path, anything else marked a bug."""
    if isinstance(exc, CkptMergeError):
        text = str(exc)
    elif isinstance(exc, OSError):
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        text = f"{paths}: {exc.strerror or exc}" if paths else str(exc)
        text += " (check the path, free space and permissions; nothing was published)"
    elif isinstance(exc, MemoryError):
        text = "out of memory; nothing was published"
    else:
        first = str(exc).splitlines()[0] if str(exc) else ""
        text = f"unexpected {type(exc).__name__}: {first} (a bug in ckptmerge; rerun with --debug and report it)"
    parts = [part.strip() for part in text.splitlines() if part.strip()] or [""]
    line = " ".join([parts[0], "; ".join(parts[1:])]).strip()
    return line if len(line) <= max_chars else line[:max_chars] + " ..."
