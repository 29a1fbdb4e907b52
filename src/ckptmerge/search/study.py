"""The search loop on an Optuna study: baselines first, then the sampler; resumable and shareable via storage."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

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
    prune_after: int = 0          # batches; 0 turns pruning off
    prune_margin: float = 0.02    # relative: prune when 2% worse than the best trial on the same batches
    objective: str = "loss"       # minimise ``loss`` (nats/token) or ``bits_per_byte``; or ``lm-eval:TASK:METRIC``
    lm_eval_include: list[str] = field(default_factory=list)  # folders of extra lm-eval task YAMLs
    lm_eval_limit: int | None = None


def make_sampler(name: str, seed: int, n_baselines: int):
    import optuna

    if name == "gp":  # the objective is deterministic: same windows, same weights -> same loss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_baselines + 2, deterministic_objective=True)
    if name == "gp-hedge":  # the paper's EI / PI / UCB portfolio
        from ckptmerge.search.gp_hedge import GPHedgeSampler

        return GPHedgeSampler(seed=seed, n_startup_trials=n_baselines + 2)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise CkptMergeError(f"unknown sampler {name!r}; choose gp, gp-hedge, tpe or random")


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

    counted = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
    while len(study.get_trials(deepcopy=False, states=counted)) < cfg.trials:
        trial = study.ask()
        coeffs = space.coeffs(space.suggest(trial))
        if cfg.objective.startswith("lm-eval:"):
            _task_trial(study, trial, objective, coeffs, cfg, log)
            continue
        stop = _pruning_rule(study, cfg) if trial.user_attrs.get("baseline") is None else None
        result = objective(coeffs, cfg.data, stop=stop)
        trial.set_user_attr("coeffs", coeffs)
        trial.set_user_attr("pid", os.getpid())
        n_windows = len(result.window_losses)
        if cfg.prune_after and n_windows:
            trial.set_user_attr("head_loss", float(sum(result.window_losses[:_head(objective, cfg)]) /
                                                   min(n_windows, _head(objective, cfg))))
        if n_windows < len(objective.windows(cfg.data)):
            study.tell(trial, state=TrialState.PRUNED)
            if log:
                log(f"trial {trial.number}: pruned after {n_windows} windows")
            continue
        value = objective_value(result, cfg.objective)
        trial.set_user_attr("stderr", result.stderr * value / result.loss if result.loss else result.stderr)
        trial.set_user_attr("nats_per_token", result.loss)
        trial.set_user_attr("bits_per_byte", result.bits_per_byte)
        study.tell(trial, value)
        if log:
            log(f"trial {trial.number}: {cfg.objective} {value:.5f} "
                f"weights {[round(c, 4) for c in coeffs]}")


def _task_trial(study, trial, objective: MergeObjective, coeffs: list[float], cfg: SearchConfig, log) -> None:
    """A downstream-task trial: lm-eval's metric on the merged weights, maximised (the study minimises its negative)."""
    score = objective.task_score(coeffs, cfg.objective, include=cfg.lm_eval_include, limit=cfg.lm_eval_limit)
    trial.set_user_attr("coeffs", coeffs)
    trial.set_user_attr("task_score", score)
    study.tell(trial, -score)
    if log:
        log(f"trial {trial.number}: {cfg.objective} {score:.5f} weights {[round(c, 4) for c in coeffs]}")


def objective_value(result, objective: str) -> float:
    """What the study minimises: nats/token, bits/byte, or minus an lm-eval score (higher is better there)."""
    value = result.metric(objective)
    if value is None:
        raise CkptMergeError(f"--objective {objective}: the data has no byte count (a token file without a "
                             "tokenizer); pass --tokenizer or use --objective loss")
    return value


def _head(objective: MergeObjective, cfg: SearchConfig) -> int:
    """Windows scored in the first ``prune_after`` batches."""
    return cfg.prune_after * objective.batch_size


def _pruning_rule(study, cfg: SearchConfig):
    """Stop a trial once, after ``prune_after`` batches, it is clearly worse than the best trial on the same windows."""
    if not cfg.prune_after:
        return None
    from optuna.trial import TrialState

    heads = [t.user_attrs["head_loss"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if "head_loss" in t.user_attrs]
    if not heads:
        return None
    best = min(heads)
    return lambda mean, batches: batches == cfg.prune_after and mean > best * (1 + cfg.prune_margin)


def trial_rows(study) -> list[dict]:
    from optuna.trial import TrialState

    return [{"trial": t.number, "params": t.params, "weights": t.user_attrs.get("coeffs"), "loss": t.value,
             "stderr": t.user_attrs.get("stderr"), "baseline": t.user_attrs.get("baseline"),
             "nats_per_token": t.user_attrs.get("nats_per_token"), "bits_per_byte": t.user_attrs.get("bits_per_byte"),
             "task_score": t.user_attrs.get("task_score")}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
