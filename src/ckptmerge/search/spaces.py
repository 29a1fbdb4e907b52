"""Search spaces: raw parameters (what the sampler sees) <-> merge coefficients over the window.

- ``pair``: lambda in [min_lambda, 1] on the newer of the two newest checkpoints (the paper's setting; its
  lower bound is the paper's alpha).
- ``simplex``: free weights over N checkpoints by stick-breaking: v_1..v_{N-1} in [0, 1],
  w_N = v_1, w_{N-1} = (1 - v_1) v_2, ..., w_1 = the rest. Bijective on the open simplex, and the
  closed cube reaches its vertices, so every baseline (newest, uniform, WMA, EMA) is exactly representable.
- ``schedule``: EMA over the newest ``last`` checkpoints of the window, ``alpha`` in [0.02, 1] (log scale).
- ``phema``: the post-hoc EMA of power-EMA snapshots (``RUN/phema``), ``sigma_rel`` in [0.02, 0.25] (log scale);
  the coefficients are EDM2's least-squares fit (``merging/power_profiles.py``), negative ones included.
Coefficients are oldest first, like every schedule in ckptmerge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.method_spec import parse_method
from ckptmerge.merging.power_profiles import gamma_to_sigma_rel
from ckptmerge.merging.schedules import compute_coeffs, phema_fit

# the simplex space's named baselines besides the newest checkpoint, in the one method language
SIMPLEX_BASELINES = {"uniform": "sma", "wma": "wma", "ema a=0.2": "ema:alpha=0.2"}


def _fake_refs(n: int) -> list[CheckpointRef]:
    return [CheckpointRef(Path(f"c{i}"), step=i) for i in range(n)]


@dataclass
class PairSpace:
    min_lambda: float = 0.0
    n: int = 2
    name = "pair"

    def suggest(self, trial) -> dict[str, float]:
        return {"lam": trial.suggest_float("lam", self.min_lambda, 1.0)}

    def coeffs(self, params: dict) -> list[float]:
        return [1.0 - params["lam"], params["lam"]]

    def baselines(self) -> dict[str, dict]:
        named = {"newest": {"lam": 1.0}, "uniform": {"lam": 0.5}, "wma": {"lam": 2 / 3}}
        return {k: v for k, v in named.items() if v["lam"] >= self.min_lambda}


@dataclass
class SimplexSpace:
    n: int
    name = "simplex"

    def suggest(self, trial) -> dict[str, float]:
        return {f"v{i}": trial.suggest_float(f"v{i}", 0.0, 1.0) for i in range(1, self.n)}

    def coeffs(self, params: dict) -> list[float]:
        rest, newest_first = 1.0, []
        for i in range(1, self.n):
            newest_first.append(rest * params[f"v{i}"])
            rest -= newest_first[-1]
        newest_first.append(rest)
        return list(reversed(newest_first))

    def params_for(self, coeffs: list[float]) -> dict[str, float]:
        """Inverse map: the stick-breaking parameters of given coefficients (oldest first)."""
        params, rest = {}, 1.0
        for i, w in enumerate(reversed(coeffs[1:]), start=1):
            params[f"v{i}"] = min(1.0, max(0.0, w / rest)) if rest > 1e-12 else 0.0
            rest -= w
        return params

    def baselines(self) -> dict[str, dict]:
        refs = _fake_refs(self.n)
        named = {"newest": [0.0] * (self.n - 1) + [1.0],
                 **{label: parse_method(spec).coeffs(refs) for label, spec in SIMPLEX_BASELINES.items()}}
        return {k: self.params_for(c) for k, c in named.items()}


@dataclass
class ScheduleSpace:
    n: int
    name = "schedule"

    def suggest(self, trial) -> dict:
        return {"alpha": trial.suggest_float("alpha", 0.02, 1.0, log=True),
                "last": trial.suggest_int("last", 1, self.n)}

    def coeffs(self, params: dict) -> list[float]:
        last = int(params["last"])
        tail = compute_coeffs("ema", _fake_refs(last), alpha=params["alpha"]) if last > 1 else [1.0]
        return [0.0] * (self.n - last) + tail

    def baselines(self) -> dict[str, dict]:
        return {"newest": {"alpha": 1.0, "last": 1}, "ema a=0.2": {"alpha": 0.2, "last": self.n}}


@dataclass
class PhemaSpace:
    refs: list[CheckpointRef]
    name = "phema"
    low, high = 0.02, 0.25

    def suggest(self, trial) -> dict[str, float]:
        return {"sigma_rel": trial.suggest_float("sigma_rel", self.low, self.high, log=True)}

    def coeffs(self, params: dict) -> list[float]:
        return phema_fit(self.refs, params["sigma_rel"]).coeffs

    def baselines(self) -> dict[str, dict]:
        """Each stored profile (its newest snapshot: the fit is exact there)."""
        stored = sorted({gamma_to_sigma_rel(r.ema_gamma) for r in self.refs if r.ema_gamma is not None})
        return {f"stored sigma_rel {s:.3f}": {"sigma_rel": s} for s in stored if self.low <= s <= self.high}


def make_space(name: str, n: int, *, min_lambda: float = 0.0, refs: list[CheckpointRef] | None = None):
    """The space ``name`` over a window of ``n`` checkpoints (``phema`` needs the window's ``refs``)."""
    if name == "phema":
        return PhemaSpace(list(refs or []))
    if name == "pair":
        return PairSpace(min_lambda=min_lambda)
    if name == "simplex":
        return SimplexSpace(n)
    if name == "schedule":
        return ScheduleSpace(n)
    raise ValueError(f"unknown space {name!r}; choose pair, simplex, schedule or phema")
