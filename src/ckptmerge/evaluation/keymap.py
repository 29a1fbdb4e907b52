"""Fit a raw state dict's names to a model's: the usual wrapper prefixes, ``--key-map`` rules, clear mismatches.

    state = fit_state(raw, model, key_map=[r"^blocks\\.=transformer.h."], source="ckpt.pt")

``--key-map OLD=NEW`` rules are regular-expression substitutions applied in order. Then the
prefixes ``_orig_mod.`` (torch.compile), ``module.`` (DDP) and ``model.`` are stripped or ``model.``
is added, whichever matches the most of the model's names. Missing names (other than tied weights),
unexpected names and shape differences are refused with a few of each listed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from ckptmerge.errors import ModelLoadError

PREFIXES = ("_orig_mod.", "module.", "model.")
SHOWN = 5


def parse_key_map(rules: Sequence[str]) -> list[tuple[str, str]]:
    """``["OLD=NEW", ...]`` -> ``[(pattern, replacement), ...]`` (patterns checked here)."""
    pairs = []
    for rule in rules:
        if "=" not in rule:
            raise ModelLoadError(f"--key-map {rule!r}: expected OLD=NEW (a regular expression and its replacement)")
        old, new = rule.split("=", 1)
        try:
            re.compile(old)
        except re.error as exc:
            raise ModelLoadError(f"--key-map {rule!r}: {old!r} is not a regular expression ({exc})") from None
        pairs.append((old, new))
    return pairs


def _strip(name: str) -> str:
    while name.startswith(PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _renamings(expected: set[str]) -> list[Callable[[str], str]]:
    return [lambda n: n, _strip, lambda n: "model." + _strip(n),
            lambda n: n if n in expected else "model." + n]


def map_names(names: Sequence[str], expected: set[str], key_map: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """``{source name: model name}`` using the rules, then the renaming that matches the most names."""
    ruled = {}
    for name in names:
        new = name
        for old, repl in key_map:
            new = re.sub(old, repl, new)
        ruled[name] = new
    best = max(_renamings(expected), key=lambda f: sum(f(n) in expected for n in ruled.values()))
    return {src: best(new) for src, new in ruled.items()}


def fit_state(state: dict[str, torch.Tensor], model: torch.nn.Module, *, key_map: Sequence[tuple[str, str]] = (),
              source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``state`` renamed to ``model``'s names; raises ModelLoadError listing what does not fit."""
    wanted = model.state_dict()
    names = map_names(list(state), set(wanted), key_map)
    fitted = {names[k]: v for k, v in state.items()}
    missing = [k for k in wanted if k not in fitted and not _is_alias(model, k, fitted)]
    unexpected = [k for k in fitted if k not in wanted and not _ignorable(model, k)]
    shapes = [f"{k} {tuple(fitted[k].shape)} vs model {tuple(wanted[k].shape)}"
              for k in fitted if k in wanted and fitted[k].shape != wanted[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:SHOWN])}{', ...' if len(items) > SHOWN else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
        raise ModelLoadError(f"{source}: the weights do not fit the model; " + "; ".join(parts) +
                             ". Fix: --model-config for the right architecture, or --key-map OLD=NEW to rename keys")
    return {k: v for k, v in fitted.items() if k in wanted}


def _is_alias(model: torch.nn.Module, name: str, given: dict) -> bool:
    """True when ``name`` is a tied parameter whose twin is in ``given`` (e.g. lm_head.weight = wte.weight)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    return any(other in given for other, p in params.items() if p is params[name] and other != name)


def _ignorable(model: torch.nn.Module, name: str) -> bool:
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(p, name) for p in patterns)
