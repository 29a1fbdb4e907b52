"""Write docs/cli.md: every flag of every ``ckptmerge`` subcommand, read from the parsers themselves.

    python scripts/gen_cli_docs.py            # regenerate docs/cli.md after changing a flag
    python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is stale (tests/test_cli_docs.py does this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ckptmerge.cli.deprecated import DeprecatedFlag
from ckptmerge.cli.main import build_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADER = """# Command line reference

Every flag of every subcommand, generated from the parsers by `python scripts/gen_cli_docs.py`
(`tests/test_cli_docs.py` fails when this file is stale). Old spellings still work for one release and
print one `ckptmerge: warning: --old is deprecated; use --new` line; they are listed here, marked
deprecated, and left out of `--help`.

One name per idea: `-o/--output` is where results go; `--data` (repeatable where several) and `--tokens`
are the held-out data and its size; `--objective` ranks; `--last N` is the window size (`n` in Python and
in a method); `--alpha` is only the EMA weight; `--schedule` only merge coefficients (`--lr-schedule` is
the learning rate); `--steps` only a list of steps to merge (`--max-steps` ends training); `--dtype` is
the compute dtype.

## Methods

`sweep --method`, `watch --method` and the search baselines take one method language, parsed by
`ckptmerge.merging.method_spec.parse_method`: `NAME[:key=value[,key=value...]]`, where NAME is a schedule
of `merging/schedules.py` (sma, wma, ema, swa, linear_decay, minus_sqrt, cosine_decay, pair, custom), the
keys are that schedule's parameters (`alpha`, `half_life`, `half_life_tokens`, `lam`, `start_step`,
`start_fraction`, `weights` written `0.2/0.3/0.5`) plus `n` (window size) and `every` (spacing in steps).
Examples: `sma:n=5`, `ema:alpha=0.2`, `ema:half_life=2000`, `minus_sqrt:n=8`, `custom:weights=0.2/0.3/0.5`.
`train --average` uses the same `kind:key=value,...` form for the online averagers (`ema:half_life=500`,
`lawa:n=5,every=200`).
"""


def render() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    parts = [HEADER]
    for name, subparser in sub.choices.items():
        parts.append(_command(name, helps.get(name) or "", subparser))
    return "\n".join(parts)


def _command(name: str, summary: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## ckptmerge {name}", "", _cell(summary), "", "| group | flag | default | help |", "|---|---|---|---|"]
    for group in parser._action_groups:
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            lines.append(f"| {_cell(group.title)} | {_flags(action)} | {_default(action)} | {_help(action)} |")
    return "\n".join(lines) + "\n"


def _flags(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
    return names


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value is argparse.SUPPRESS or value is False or value == []:
        return ""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"`{value}`"


def _help(action: argparse.Action) -> str:
    if isinstance(action, DeprecatedFlag):
        return f"**deprecated**: use `{action.replacement}`"
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "default": action.default}
    if action.choices and "|" not in text:
        text = f"{text} (one of: {', '.join(str(c) for c in action.choices)})".lstrip()
    return _cell(text)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    text = render()
    if check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
