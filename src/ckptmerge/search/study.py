"""The search loop on an Optuna study: baselines first, then the sampler; resumable, shared by any number of workers."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

from ckptmerge.console import progress_bar
from ckptmerge.errors import CkptMergeError
from ckptmerge.search.objective import MergeObjective
from ckptmerge.search.storage import (
    DEFAULT_HEARTBEAT_S,
    claim,
    fail_dead_trials,
    finished_elsewhere,
    goes_first,
    grace_period,
    open_storage,
    reap_dead_workers,
)


@dataclass
class SearchConfig:
    space: str = "pair"
    data: str = "shakespeare-val"
    trials: int = 20
    sampler: str = "gp"
    seed: int = 0
    storage: str | None = None
    study_name: str = "ckptmerge-search"
    min_lambda: float = 0.0       # pair: lower bound of lambda (the BO-merging paper's alpha)
    prune_after: int = 0          # batches; 0 turns pruning off
    prune_margin: float = 0.02    # relative: prune when 2% worse than the best trial on the same batches
    objective: str = "loss"       # minimise ``loss`` (nats/token) or ``bits_per_byte``; or ``lm-eval:TASK:METRIC``
    lm_eval_include: list[str] = field(default_factory=list)  # folders of extra lm-eval task YAMLs
    lm_eval_limit: int | None = None
    heartbeat_s: float = DEFAULT_HEARTBEAT_S  # RDB storages: a trial silent for 3x this is failed and re-queued


def make_sampler(name: str, seed: int, n_baselines: int):
    """The sampler ``name``, made at the worker's first trial and seeded per worker (``worker_sampler.py``)."""
    from ckptmerge.search.worker_sampler import WorkerSeededSampler

    if name not in SAMPLERS:
        raise CkptMergeError(f"unknown sampler {name!r}; choose gp, gp-hedge, tpe or random")
    return WorkerSeededSampler(lambda worker_seed: _sampler(name, worker_seed, n_baselines), seed)


SAMPLERS = ("gp", "gp-hedge", "tpe", "random")


def _sampler(name: str, seed: int, n_baselines: int):
    import optuna

    if name == "gp":  # the objective is deterministic: same windows, same weights -> same loss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_baselines + 2, deterministic_objective=True)
    if name == "gp-hedge":  # the paper's EI / PI / UCB portfolio
        from ckptmerge.search.gp_hedge import GPHedgeSampler

        return GPHedgeSampler(seed=seed, n_startup_trials=n_baselines + 2)
    if name == "tpe":  # constant liar: running trials count as bad, so parallel workers spread out
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # Optuna 4.x only
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(cfg: SearchConfig, space):
    """Create or load the study; re-queue every baseline that has no complete, queued or running trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    baselines = space.baselines()
    study = optuna.create_study(study_name=cfg.study_name, storage=open_storage(cfg.storage, heartbeat_s=cfg.heartbeat_s),
                                direction="minimize", sampler=make_sampler(cfg.sampler, cfg.seed, len(baselines)),
                                load_if_exists=True)
    reap_dead_workers(study, grace_period(cfg.heartbeat_s))
    for name, params in baselines.items():  # evaluated first, so the result is never worse than them
        if not _baseline_owned(study, name):
            study.enqueue_trial(params, user_attrs={"baseline": name})
    return study


class DuplicateBaseline(Exception):
    """A baseline trial with a twin that completed or was queued first (workers that started together both
    enqueued it). The trial that pops it fails it; no worker ever changes a trial another worker runs."""


def _baseline_owned(study, name: str) -> bool:
    """A trial of baseline ``name`` is complete, queued, or running (a dead worker's is re-queued by the retry)."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    return any(t.user_attrs.get("baseline") == name for t in study.get_trials(deepcopy=False, states=live))


def run_trials(study, space, objective: MergeObjective, cfg: SearchConfig, *, log=None) -> None:
    """Run trials until the study holds ``cfg.trials`` finished ones: COMPLETE, or PRUNED when pruning is on
    (a pruned trial is finished work; counting only completes could run forever when the sampler keeps
    proposing points that get pruned). Failed trials and the RUNNING trials of dead workers never count.
    A point already scored (weights within ``WEIGHT_TOLERANCE``) is answered from its trial's record, is not
    evaluated and does not count; the sampler is asked again (at most ``MAX_REPEATS_IN_A_ROW`` times in a row).

    Several workers (processes, machines) may run this on one study: a worker starts a trial only while
    complete + running trials fall short of ``cfg.trials``, and otherwise waits for the running ones, which
    either complete or, if their worker died, are failed and re-queued (``search/storage.py``) and run here.
    """
    from optuna.trial import TrialState

    def evaluate(trial) -> float:
        return _evaluate_trial(trial, study, space, objective, cfg, log)

    repeats = [0]  # this worker's proposals in a row that were points already scored

    def count_repeat(_study, trial) -> None:
        repeats[0] = repeats[0] + 1 if is_repeat(trial) else 0

    bar = progress_bar(cfg.trials, "search", unit="trial", enabled=log is not None)  # the CLI's runs
    while True:
        fail_dead_trials(study, cfg.heartbeat_s)
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        complete = sum(not is_repeat(t) for t in finished)  # distinct points: repeats are answered, not counted
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        bar.update(min(complete, cfg.trials) - bar.n)  # trials finished by every worker of the study
        if complete >= cfg.trials or repeats[0] >= MAX_REPEATS_IN_A_ROW:
            bar.close()
            if complete < cfg.trials:
                warnings.warn(f"search: the sampler proposed only points already scored, {repeats[0]} times in a "
                              f"row; stopping with {complete} distinct points of --trials {cfg.trials}", stacklevel=2)
            return
        if complete + running >= cfg.trials:
            time.sleep(POLL_S)  # the last trials run elsewhere; stay to re-run any whose worker dies
            continue
        with finished_elsewhere():
            study.optimize(evaluate, n_trials=1, catch=(DuplicateBaseline,), callbacks=[count_repeat])


MAX_REPEATS_IN_A_ROW = 50  # the sampler has converged: it keeps asking for points it knows
WEIGHT_TOLERANCE = 1e-6    # two trials whose merge weights differ by at most this (each) are the same point


def is_repeat(trial) -> bool:
    return trial.user_attrs.get("repeat_of") is not None


def _scored_twin(study, coeffs: list[float]):
    """A finished trial (complete or pruned) whose weights equal ``coeffs`` within ``WEIGHT_TOLERANCE``, or None."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        weights = t.user_attrs.get("coeffs")
        if weights is not None and len(weights) == len(coeffs) and \
                all(abs(float(a) - float(b)) <= WEIGHT_TOLERANCE for a, b in zip(weights, coeffs)):
            return t
    return None


def _answer_from_record(trial, twin, coeffs: list[float], log) -> float:
    """A repeat of ``twin``: its recorded value (the sampler learns the point is known), and no evaluation."""
    import optuna
    from optuna.trial import TrialState

    trial.set_user_attr("repeat_of", twin.number)
    trial.set_user_attr("coeffs", coeffs)
    if log:
        log(f"trial {trial.number}: weights {[round(c, 4) for c in coeffs]} already scored by trial {twin.number}; "
            "answered from the record, not counted")
    if twin.state == TrialState.PRUNED:
        raise optuna.TrialPruned()
    return twin.value


POLL_S = 0.5


def _evaluate_trial(trial, study, space, objective: MergeObjective, cfg: SearchConfig, log) -> float:
    import optuna

    claim(trial)
    params = space.suggest(trial)
    baseline = trial.user_attrs.get("baseline")
    if baseline is not None and not _same_params(params, space.baselines().get(baseline)):
        trial.set_user_attr("baseline", None)  # a retried trial that never had the baseline's parameters
        baseline = None
    if baseline is not None:
        if goes_first(study, trial, "baseline"):
            raise DuplicateBaseline(baseline)  # failed, not retried; the twin is the baseline's trial
    coeffs = space.coeffs(params)
    twin = _scored_twin(study, coeffs) if baseline is None else None
    if twin is not None:
        return _answer_from_record(trial, twin, coeffs, log)
    if cfg.objective.startswith("lm-eval:"):
        return _task_value(trial, objective, coeffs, cfg, log)
    stop = _pruning_rule(study, cfg) if baseline is None else None
    result = objective(coeffs, cfg.data, stop=stop)
    trial.set_user_attr("coeffs", coeffs)
    n_windows = len(result.window_losses)
    if cfg.prune_after and n_windows:
        trial.set_user_attr("head_loss", float(sum(result.window_losses[:_head(objective, cfg)]) /
                                               min(n_windows, _head(objective, cfg))))
    if n_windows < len(objective.windows(cfg.data)):
        if log:
            log(f"trial {trial.number}: pruned after {n_windows} windows")
        raise optuna.TrialPruned()
    value = objective_value(result, cfg.objective)
    trial.set_user_attr("stderr", result.stderr * value / result.loss if result.loss else result.stderr)
    trial.set_user_attr("nats_per_token", result.loss)
    trial.set_user_attr("bits_per_byte", result.bits_per_byte)
    if log:
        log(f"trial {trial.number}: {cfg.objective} {value:.5f} weights {[round(c, 4) for c in coeffs]}")
    return value


def _task_value(trial, objective: MergeObjective, coeffs: list[float], cfg: SearchConfig, log) -> float:
    """A downstream-task trial: lm-eval's metric on the merged weights, maximised (the study minimises its negative)."""
    score = objective.task_score(coeffs, cfg.objective, include=cfg.lm_eval_include, limit=cfg.lm_eval_limit)
    trial.set_user_attr("coeffs", coeffs)
    trial.set_user_attr("task_score", score)
    if log:
        log(f"trial {trial.number}: {cfg.objective} {score:.5f} weights {[round(c, 4) for c in coeffs]}")
    return -score


def objective_value(result, objective: str) -> float:
    """What the study minimises: nats/token, bits/byte, or minus an lm-eval score (higher is better there)."""
    value = result.metric(objective)
    if value is None:
        raise CkptMergeError(f"--objective {objective}: the data has no byte count (a token file without a "
                             "tokenizer); pass --tokenizer or use --objective loss")
    return value


def _same_params(params: dict, expected: dict | None) -> bool:
    return expected is not None and params.keys() == expected.keys() and \
        all(abs(float(params[k]) - float(expected[k])) <= 1e-12 for k in params)


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
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not is_repeat(t)]
