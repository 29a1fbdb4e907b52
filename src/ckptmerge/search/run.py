"""``search``: tune merge weights on one domain, write the best merge, report every other domain.

    ckptmerge search runs/demo/stable --last 2 --space pair --data shakespeare-val --trials 12 -o out/best
    ckptmerge search runs/demo/stable --last 6 --every 50 --space simplex --trials 30 \\
        --storage sqlite:///study.db --study demo-simplex --workers 2 --json results.json
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ckptmerge.evaluation.evaluator import check_metric, paired_difference
from ckptmerge.evaluation.settings import EvalSettings
from ckptmerge.errors import import_optional
from ckptmerge.io.publish import check_destination
from ckptmerge.io.remote import refuse_urls
from ckptmerge.merging.checkpoint import CheckpointRef
from ckptmerge.merging.discover import describe_path
from ckptmerge.merging.offline import merge
from ckptmerge.parallel.world import refuse_ranks
from ckptmerge.search.objective import MergeObjective
from ckptmerge.search.spaces import make_space
from ckptmerge.search.study import SearchConfig, open_study, run_trials, trial_rows


# what takes URLs today (docs/storage.md): the data and the tokenizer; the checkpoints are merged in memory from
# local files only so far
SEARCH_URLS = ("--data and --tokenizer take URLs; copy the run to a local folder to search it (`ckptmerge merge URL` "
               "and `ckptmerge eval URL` read runs at URLs)")


@dataclass
class SearchResult:
    best_weights: list[float]
    best_loss: float
    trials: list[dict]
    generalization: dict


def search(refs: list[CheckpointRef], cfg: SearchConfig, *, n_tokens: int = 16384, workers: int = 1,
           output: str | Path | None = None, report_data: list[str] | None = None, plots: str | Path | None = None,
           log=None, settings: EvalSettings | None = None, force: bool = False) -> SearchResult:
    """Run (or resume) the study, then write the best merge and the cross-domain comparison.

    An existing ``output`` is refused before any trial runs unless ``force``; ``cfg`` is never modified.
    """
    refuse_ranks("search", "start the same command once per worker with one --storage (docs/scale.md)")
    refuse_urls("search", SEARCH_URLS, checkpoint=[r.path for r in refs], output=output, plots=plots)
    _require_extras(cfg, plots)
    _check_objective(cfg.objective)
    if output:
        check_destination(Path(output), force)
    space = make_space(cfg.space, len(refs), min_lambda=cfg.min_lambda, refs=refs)
    if cfg.space == "pair":
        refs = refs[-2:]
    if workers > 1 and cfg.storage is None:
        cfg = replace(cfg, storage=f"sqlite:///{Path(tempfile.mkdtemp(prefix='ckptmerge-study-')) / 'study.db'}")
    study = open_study(cfg, space)
    if workers > 1:
        _run_workers(refs, cfg, n_tokens, workers, settings)
    objective = MergeObjective(refs, n_tokens=n_tokens, settings=settings)  # workers > 1: used for the report only
    if workers == 1:
        run_trials(study, space, objective, cfg, log=log)
    rows = trial_rows(study)
    best = min(rows, key=lambda r: r["loss"])
    result = SearchResult(best["weights"], best["loss"], rows,
                          _generalization(objective, best, rows, [cfg.data, *(report_data or [])], cfg.objective))
    if plots:
        _write_plots(Path(plots), cfg, refs, result)
    if output:
        recipe = {"schedule": "custom", "weights": best["weights"], "search": {**asdict(cfg), "best_trial": best["trial"],
                                                                                 "best_loss": best["loss"]}}
        # checked before the trials; the workers of one shared study may each publish the same best merge here
        merge(refs, best["weights"], output, force=True, progress=False, recipe=recipe, allow_unnormalized=True,
              allow_negative=cfg.space == "phema")  # the post-hoc EMA's least-squares weights
    return result


def _require_extras(cfg: SearchConfig, plots: str | Path | None) -> None:
    """Optuna (and SciPy for its GP samplers, matplotlib for ``plots``): the ``search`` and ``plots`` extras."""
    import_optional("optuna", extra="search", needed_by="search")
    if cfg.sampler in ("gp", "gp-hedge"):
        import_optional("scipy", extra="search", needed_by=f"search --sampler {cfg.sampler}")
    if plots:
        import_optional("matplotlib", extra="plots", needed_by="search --plots")


def _check_objective(objective: str) -> None:
    """Refuse an unknown ``--objective`` before any trial runs."""
    if objective.startswith("lm-eval:"):
        from ckptmerge.evaluation.lm_eval_tasks import parse_objective

        parse_objective(objective)
    else:
        check_metric(objective, "--objective")


def _write_plots(folder: Path, cfg: SearchConfig, refs: list[CheckpointRef], result: SearchResult) -> None:
    from ckptmerge.search.plots import plot_pair, plot_weights

    folder.mkdir(parents=True, exist_ok=True)
    if cfg.space == "pair":
        plot_pair(result.trials, folder / "loss_vs_lambda.png", min_lambda=cfg.min_lambda)
    plot_weights(result.best_weights, [r.name for r in refs], folder / "best_weights.png")


def _generalization(objective: MergeObjective, best: dict, rows: list[dict], domains: list[str],
                    metric: str = "loss") -> dict:
    """Best weights vs each baseline on every domain: losses and paired differences (best - baseline).

    ``loss`` is in nats/token (or bits/byte when that is the ``metric``); both units are in every entry.
    """
    candidates = {"searched": best["weights"], **{r["baseline"]: r["weights"] for r in rows if r["baseline"]}}
    report = {}
    for data in dict.fromkeys(domains):
        scores = {name: objective(w, data) for name, w in candidates.items()}
        report[data] = {name: _entry(s, scores["searched"], metric) for name, s in scores.items()}
    return report


def _entry(result, searched, metric: str) -> dict:
    scale = result.bits_per_byte / result.loss if metric == "bits_per_byte" and result.bits_per_byte else 1.0
    diff, se = paired_difference(result, searched)
    return {"loss": result.loss * scale, "stderr": result.stderr * scale, "unit": _unit(metric),
            "nats_per_token": result.loss, "bits_per_byte": result.bits_per_byte,
            "diff_vs_searched": diff * scale, "se": se * scale}


def _unit(metric: str) -> str:
    return "bits/byte" if metric == "bits_per_byte" else "nats/token"


def _worker(paths: list[str], cfg: SearchConfig, n_tokens: int, threads: int, settings: EvalSettings | None) -> None:
    torch.set_num_threads(threads)
    refs = [describe_path(p) for p in paths]
    space = make_space(cfg.space, len(refs), min_lambda=cfg.min_lambda, refs=refs)
    run_trials(open_study(cfg, space), space, MergeObjective(refs, n_tokens=n_tokens, settings=settings), cfg)


def _run_workers(refs: list[CheckpointRef], cfg: SearchConfig, n_tokens: int, workers: int,
                 settings: EvalSettings | None = None) -> None:
    ctx = mp.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    procs = [ctx.Process(target=_worker, args=([str(r.path) for r in refs], cfg, n_tokens, threads, settings))
             for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} search worker(s) failed (exit codes {failed})")


def write_results(path: Path, result: SearchResult) -> None:
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
