"""The search loop on an Optuna study: baselines first, then the sampler; resumable and shareable via storage."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from ckptmerge.errors import CkptMergeError
from ckptmerge.search.objective import MergeObjective


@dataclass
class SearchConfig:
    space: str = "pair"
    data: str = "shakespeare-val"
    trials: int = 20
    sampler: str = "gp"
    seed: int = 0
    storage: str | None = None
    study_name: str = "ckptmerge-search"
    alpha: float = 0.0


def make_sampler(name: str, seed: int, n_baselines: int):
    import optuna

    if name == "gp":  # the objective is deterministic: same windows, same weights -> same loss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_baselines + 2, deterministic_objective=True)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise CkptMergeError(f"unknown sampler {name!r}; choose gp, tpe or random")


def open_study(cfg: SearchConfig, space):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    baselines = space.baselines()
    study = optuna.create_study(study_name=cfg.study_name, storage=cfg.storage, direction="minimize",
                                sampler=make_sampler(cfg.sampler, cfg.seed, len(baselines)), load_if_exists=True)
    for name, params in baselines.items():  # evaluated first, so the result is never worse than them
        study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=True)
    return study


def run_trials(study, space, objective: MergeObjective, cfg: SearchConfig, *, log=None) -> None:
    """Ask / evaluate / tell until the study holds ``cfg.trials`` finished or running trials."""
    from optuna.trial import TrialState

    while len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))) < cfg.trials:
        trial = study.ask()
        coeffs = space.coeffs(space.suggest(trial))
        result = objective(coeffs, cfg.data)
        trial.set_user_attr("coeffs", coeffs)
        trial.set_user_attr("stderr", result.stderr)
        trial.set_user_attr("pid", os.getpid())
        study.tell(trial, result.loss)
        if log:
            log(f"trial {trial.number}: loss {result.loss:.5f} weights {[round(c, 4) for c in coeffs]}")


def trial_rows(study) -> list[dict]:
    from optuna.trial import TrialState

    return [{"trial": t.number, "params": t.params, "weights": t.user_attrs.get("coeffs"), "loss": t.value,
             "stderr": t.user_attrs.get("stderr"), "baseline": t.user_attrs.get("baseline")}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
