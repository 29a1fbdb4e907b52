"""Weight search on the demo run: GP vs random (and a dense grid for pair), and the cost of one trial.

- pair (the two newest checkpoints of the stable phase): a 41-point lambda grid gives the optimum;
  report how many evaluations GP and random search need to come within 0.2% of it.
- simplex over the last N = 5 and 10 checkpoints (every 50 steps): best loss after 10 / 20 / 40
  evaluations for GP, TPE and random search (baselines enqueued first for all of them).
- trial cost: one trial (in-memory merge + weights into the model + evaluation) over one plain
  evaluation of the same model on the same windows. Target: at most 1.2x.

    bash scripts/demo.sh                # writes runs/demo/stable
    .venv/bin/python benchmarks/bench_search.py --run runs/demo/stable
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ckptmerge import discover, select_last
from ckptmerge.evaluation.evaluator import evaluate_model
from ckptmerge.search.objective import MergeObjective
from ckptmerge.search.spaces import make_space
from ckptmerge.search.study import SearchConfig, open_study, run_trials, trial_rows

DATA = "shakespeare-val"


def best_curve(refs, space_name: str, sampler: str, budget: int, n_tokens: int, objective) -> list[float]:
    """Best loss after each evaluation (baselines first), for one sampler."""
    cfg = SearchConfig(space=space_name, data=DATA, trials=budget, sampler=sampler, seed=0,
                       study_name=f"{space_name}-{sampler}-{len(refs)}")
    space = make_space(space_name, len(refs))
    study = open_study(cfg, space)
    run_trials(study, space, objective, cfg)
    losses = [r["loss"] for r in sorted(trial_rows(study), key=lambda r: r["trial"])]
    return list(np.minimum.accumulate(losses))


def pair_table(refs, n_tokens: int) -> None:
    objective = MergeObjective(refs[-2:], n_tokens=n_tokens)
    grid = [objective([1 - lam, lam], DATA).loss for lam in np.linspace(0, 1, 41)]
    targets = {"0.2%": min(grid) * 1.002, "0.02%": min(grid) * 1.0002}
    print(f"\npair ({refs[-2].name}, {refs[-1].name}): grid optimum {min(grid):.5f} at lambda "
          f"{np.linspace(0, 1, 41)[int(np.argmin(grid))]:.3f}\n")
    print("| method | evaluations to within 0.2% (of 20) | to within 0.02% | best after 20 |")
    print("|---|---|---|---|")
    curves = {"dense grid, 41 points in grid order": list(np.minimum.accumulate(grid))}
    for sampler in ("gp", "random"):
        curves[sampler] = best_curve(refs[-2:], "pair", sampler, 20, n_tokens, objective)
    for name, curve in curves.items():
        hits = [next((i + 1 for i, v in enumerate(curve) if v <= t), "not reached") for t in targets.values()]
        print(f"| {name} | {hits[0]} | {hits[1]} | {min(curve):.5f} |", flush=True)


def simplex_table(refs_all, n_tokens: int, every: int) -> None:
    print("\n| N | method | best after 10 | best after 20 | best after 40 |")
    print("|---|---|---|---|---|")
    for n in (5, 10):
        refs = select_last(refs_all, n, every_steps=every)
        objective = MergeObjective(refs, n_tokens=n_tokens)
        for sampler in ("gp", "tpe", "random"):
            curve = best_curve(refs, "simplex", sampler, 40, n_tokens, objective)
            print(f"| {n} | {sampler} | {curve[9]:.5f} | {curve[19]:.5f} | {curve[39]:.5f} |", flush=True)


def trial_cost(refs, n_tokens: int) -> None:
    objective = MergeObjective(refs, n_tokens=n_tokens)
    windows = objective.windows(DATA)
    weights = [1.0 / len(refs)] * len(refs)
    trial_s, eval_s = [], []
    for _ in range(5):
        start = time.perf_counter()
        objective(weights, DATA)
        trial_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        evaluate_model(objective.model, windows)
        eval_s.append(time.perf_counter() - start)
    t, e = statistics.median(trial_s), statistics.median(eval_s)
    print(f"\ntrial cost (N={len(refs)}, {n_tokens} tokens): trial {t:.3f} s, plain evaluation {e:.3f} s, "
          f"ratio {t / e:.3f} (target <= 1.2)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo/stable")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--parts", nargs="+", default=["cost", "pair", "simplex"], choices=["cost", "pair", "simplex"])
    args = p.parse_args()
    refs = discover(args.run).checkpoints
    if "cost" in args.parts:
        trial_cost(select_last(refs, 10, every_steps=args.every), args.tokens)
    if "pair" in args.parts:
        pair_table(refs, args.tokens)
    if "simplex" in args.parts:
        simplex_table(refs, args.tokens, args.every)


if __name__ == "__main__":
    main()
