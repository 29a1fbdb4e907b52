"""GP-Hedge (Hoffman, Brochu & de Freitas, 2011), the BO merging paper's acquisition portfolio, on Optuna's GP.

Each round fits Optuna's Gaussian process (Matern-5/2, its priors, ``optuna._gp``) to the finished
trials. EI, PI and UCB each nominate the best of a shared set of random candidates. One nominee
is chosen with probability proportional to exp(eta * gain), and each acquisition's gain then grows
by the GP's posterior mean at its previous nominee. Parameters are normalized to [0, 1] (log scale
for log distributions, rounded for ints). The gains live in the sampler object, so with several
workers each keeps its own portfolio.

``optuna._gp`` is Optuna's private module: if a future Optuna moves it, the import error below
says so, and ``--sampler gp`` keeps working.
"""

from __future__ import annotations

import math

import numpy as np
import optuna
import torch
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

try:
    from optuna._gp.acqf import logei
    from optuna._gp.gp import fit_kernel_params
    from optuna._gp.prior import DEFAULT_MINIMUM_NOISE_VAR, default_log_prior
except ImportError as exc:  # pragma: no cover - depends on the installed Optuna
    raise ImportError(f"GP-Hedge needs Optuna's GP module (optuna._gp, Optuna 4.x-5.x): {exc}. "
                      f"Use --sampler gp instead.") from exc

ACQUISITIONS = ("ei", "pi", "ucb")


class GPHedgeSampler(optuna.samplers.BaseSampler):
    def __init__(self, *, seed: int | None = None, n_startup_trials: int = 5, eta: float = 1.0,
                 ucb_beta: float = 2.0, n_candidates: int = 2048):
        self._rng = np.random.default_rng(seed)
        self._independent = optuna.samplers.RandomSampler(seed=seed)
        self.n_startup_trials, self.eta, self.ucb_beta, self.n_candidates = n_startup_trials, eta, ucb_beta, n_candidates
        self.gains = np.zeros(len(ACQUISITIONS))
        self.chosen: list[str] = []
        self._last_nominees: np.ndarray | None = None

    def infer_relative_search_space(self, study, trial):
        space = optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))
        return {k: d for k, d in space.items() if isinstance(d, (FloatDistribution, IntDistribution))}

    def sample_relative(self, study, trial, search_space):
        trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if all(k in t.params for k in search_space)]
        if not search_space or len(trials) < self.n_startup_trials:
            return {}
        names = sorted(search_space)
        x = np.array([[_to_unit(t.params[n], search_space[n]) for n in names] for t in trials])
        y = -np.array([t.value for t in trials])  # the GP maximizes; ckptmerge minimizes loss
        y = (y - y.mean()) / (y.std() or 1.0)
        gpr = fit_kernel_params(X=x, Y=y, is_categorical=np.zeros(len(names), dtype=bool),
                                log_prior=default_log_prior, minimum_noise=DEFAULT_MINIMUM_NOISE_VAR,
                                deterministic_objective=True)
        nominees = self._nominate(gpr, x, float(y.max()))
        if self._last_nominees is not None and self._last_nominees.shape[1] == nominees.shape[1]:
            with torch.no_grad():
                self.gains += gpr.posterior(torch.from_numpy(self._last_nominees))[0].numpy()
        p = np.exp(self.eta * (self.gains - self.gains.max()))
        pick = int(self._rng.choice(len(ACQUISITIONS), p=p / p.sum()))
        self._last_nominees = nominees
        self.chosen.append(ACQUISITIONS[pick])
        return {n: _from_unit(v, search_space[n]) for n, v in zip(names, nominees[pick])}

    def _nominate(self, gpr, x: np.ndarray, best: float) -> np.ndarray:
        """The argmax of EI, PI and UCB over random candidates (plus jitter around the best point)."""
        best_x = x[int(np.argmax(gpr._y_train.squeeze(-1).numpy()))]
        local = np.clip(best_x + 0.05 * self._rng.standard_normal((self.n_candidates // 4, x.shape[1])), 0, 1)
        candidates = np.vstack([self._rng.random((self.n_candidates, x.shape[1])), local])
        with torch.no_grad():
            mean, var = gpr.posterior(torch.from_numpy(candidates))
            sd = var.clamp_min(1e-12).sqrt()
            scores = {
                "ei": logei(mean=mean, var=var + 1e-12, f0=best),
                "pi": torch.special.log_ndtr((mean - best) / sd),
                "ucb": mean + math.sqrt(self.ucb_beta) * sd,
            }
        return np.stack([candidates[int(torch.argmax(scores[a]))] for a in ACQUISITIONS])

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._independent.sample_independent(study, trial, param_name, param_distribution)


def _to_unit(value: float, dist) -> float:
    low, high = (math.log(dist.low), math.log(dist.high)) if dist.log else (dist.low, dist.high)
    v = math.log(value) if dist.log else value
    return 0.0 if high == low else (v - low) / (high - low)


def _from_unit(u: float, dist):
    low, high = (math.log(dist.low), math.log(dist.high)) if dist.log else (dist.low, dist.high)
    v = low + float(np.clip(u, 0.0, 1.0)) * (high - low)
    v = math.exp(v) if dist.log else v
    if isinstance(dist, IntDistribution):
        return int(min(dist.high, max(dist.low, round(v))))
    return float(min(dist.high, max(dist.low, v)))
