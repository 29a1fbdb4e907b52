"""Old flag spellings, kept for one release: each use prints ``ckptmerge: warning: --old is deprecated; use --new``.

``add_renamed(p, "--out", "--output")`` after ``--output`` is added: the old spelling sets the same value the
same way (store, append, store_true). ``add_deprecated(p, "--schedule", "--method", ...)`` for an old flag
whose value the command translates itself. Both are left out of ``--help`` (one spelling per idea there);
``scripts/gen_cli_docs.py`` lists them, marked deprecated, in docs/cli.md.
"""

from __future__ import annotations

import argparse
import warnings


class DeprecatedFlag(argparse.Action):
    """A flag that still works and warns once per use; ``replacement`` names what to write instead."""

    def __init__(self, option_strings, dest, *, replacement: str, target: argparse.Action | None = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement, self.target = replacement, target

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated; use {self.replacement}", DeprecationWarning, stacklevel=1)
        if self.target is not None:
            self.target(parser, namespace, values, option_string)
        else:
            setattr(namespace, self.dest, values)


def add_renamed(parser, old: str, new: str) -> None:
    """Add ``old`` as a deprecated spelling of the flag ``new`` (already added): same destination and type."""
    target = next(a for a in parser._actions if new in a.option_strings)
    parser.add_argument(old, action=DeprecatedFlag, replacement=new, target=target, dest=target.dest,
                        nargs=target.nargs, type=target.type, choices=target.choices, metavar=target.metavar,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_deprecated(parser, old: str, replacement: str, **kwargs) -> None:
    """Add an old flag whose value the command translates itself (``replacement`` says what to write now)."""
    parser.add_argument(old, action=DeprecatedFlag, replacement=replacement, help=argparse.SUPPRESS, **kwargs)
