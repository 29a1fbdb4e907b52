"""docs/cli.md is the parsers' own listing; ``--help`` uses one spelling per idea; old spellings still work and warn."""

import argparse
import importlib.util
import re
import warnings
from pathlib import Path

import pytest

from ckptmerge.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _help_flags(parser: argparse.ArgumentParser) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", parser.format_help()))


def test_docs_cli_md_is_what_the_parsers_say():
    generator = _generator()
    assert (ROOT / "docs" / "cli.md").read_text() == generator.render(), \
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def test_docs_list_every_flag_of_every_subcommand_deprecated_ones_marked():
    text = (ROOT / "docs" / "cli.md").read_text()
    for name, parser in _subparsers().items():
        section = text.split(f"## ckptmerge {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for flag in action.option_strings if not isinstance(action, argparse._HelpAction) else ():
                assert f"`{flag}`" in section, (name, flag)
        assert "| `--out` |  | **deprecated**: use `--output` |" in text


# idea -> the one spelling --help may show; the old spellings, and where a flag may appear at all
BANNED = {"--out": "-o/--output", "--n": "--last", "--metric": "--objective", "--methods": "--method",
          "--eval": "--data"}
ONLY_IN = {
    "--alpha": {"merge"},                    # the EMA weight; search's lower bound is --min-lambda
    "--schedule": {"merge"},                 # merge coefficients; the learning rate is --lr-schedule
    "--steps": {"merge"},                    # a list of steps to merge; training ends at --max-steps
    "--eval-data": {"train"},                # train: --eval-every's data, until train's old --data alias goes
    "--eval-tokens": {"train"},
}


def test_help_shows_one_spelling_per_idea():
    seen = {}
    for name, parser in _subparsers().items():
        flags = _help_flags(parser)
        seen[name] = flags
        for old, new in BANNED.items():
            assert old not in flags, f"ckptmerge {name} --help shows {old}; the one spelling is {new}"
        for flag, allowed in ONLY_IN.items():
            assert flag not in flags or name in allowed, f"ckptmerge {name} --help shows {flag}"
        output = [a for a in parser._actions if "-o" in a.option_strings]
        assert all(a.option_strings == ["-o", "--output"] for a in output), name
        window = [a for a in parser._actions if "--last" in a.option_strings or "--n" in a.option_strings]
        assert all("--last" in a.option_strings for a in window if a.help != argparse.SUPPRESS), name
    assert "--dtype" not in seen["merge"] or "--out-dtype" not in seen["merge"]  # merge: --out-dtype is the output
    for name in ("sweep", "recover", "demo", "train", "search", "watch", "merge", "data"):
        assert "--output" in seen[name], name
    for name in ("eval", "sweep", "search", "watch"):
        assert {"--data", "--tokens"} <= seen[name], name


OLD_AND_NEW = [
    (["sweep", "r", "--out", "o", "--n", "2,3", "--metric", "bits_per_byte"],
     ["sweep", "r", "--output", "o", "--last", "2,3", "--objective", "bits_per_byte"]),
    (["recover", "r", "--out", "o", "--n", "4", "--steps", "90"],
     ["recover", "r", "-o", "o", "--last", "4", "--max-steps", "90"]),
    (["demo", "--out", "o", "--eval-data", "a", "--eval-data", "b"], ["demo", "-o", "o", "--data", "a", "--data", "b"]),
    (["reproduce", "lawa", "--eval-data", "v", "--schedule", "wsd"],
     ["reproduce", "lawa", "--data", "v", "--lr-schedule", "wsd"]),
    (["search", "r", "--alpha", "0.3"], ["search", "r", "--min-lambda", "0.3"]),
    (["train", "-o", "r", "--steps", "8", "--schedule", "wsd", "--data", "d"],
     ["train", "-o", "r", "--max-steps", "8", "--lr-schedule", "wsd", "--train-data", "d"]),
    (["watch", "r", "-o", "w", "--eval", "a", "--eval-tokens", "64"],
     ["watch", "r", "-o", "w", "--data", "a", "--tokens", "64"]),
]


@pytest.mark.parametrize("old, new", OLD_AND_NEW, ids=[o[0] for o, _ in OLD_AND_NEW])
def test_old_spellings_parse_to_the_same_options_and_warn(old, new):
    parser = build_parser()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = vars(parser.parse_args(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = vars(build_parser().parse_args(new))
    assert got == want
    renamed = [a for a in old if a.startswith("--") and a not in new]
    messages = {str(w.message) for w in caught if w.category is DeprecationWarning}
    assert {m.split(" is deprecated")[0] for m in messages} == set(renamed), messages


def test_an_old_spelling_prints_one_warning_line(capsys):
    assert main(["sweep", "/nonexistent/run", "--n", "2", "--n", "3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "ckptmerge: warning: --n is deprecated; use --last"
    assert sum("deprecated" in line for line in err) == 1
