"""Post-hoc EMA on ckptmerge's own trainer: held-out loss vs sigma_rel, reconstructed after training from phema
snapshots, beside power EMAs of the same sigma_rel tracked directly during the same run.

One run of ``ckptmerge train`` with ``--average phema:sigma_rel=0.05/0.10,every=K`` (the snapshots, in RUN/phema)
and one ``--average power_ema:sigma_rel=S`` per S (the ground truth, in the final checkpoint's avg-power_ema-N).
Each S is then reconstructed by ``ckptmerge merge RUN/phema --schedule phema:sigma_rel=S`` and both are scored on
the same held-out windows (shakespeare-val). Prints a markdown table (docs/posthoc-ema.md quotes it).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_posthoc_ema.py --steps 200 --every 20 --warmup 20
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from ckptmerge.data.batches import eval_windows
from ckptmerge.data.tokens import load_tokens
from ckptmerge.evaluation.evaluator import evaluate_model, load_model
from ckptmerge.io.dispatch import open_checkpoint
from ckptmerge.merging.recipe import MergeRecipe
from ckptmerge.merging.window import run_recipe
from ckptmerge.train.trainer import TrainConfig, averager_names, train

SIGMA_RELS = (0.03, 0.05, 0.07, 0.10, 0.15, 0.20)


def relative_distance(a_path: Path, b_path: Path) -> float:
    """||a - b|| / ||b|| over every float tensor (fp64)."""
    a, b = open_checkpoint(a_path), open_checkpoint(b_path)
    names = [n for n in b.keys() if b.get(n).is_floating_point()]
    diff = sum(float(((a.get(n).double() - b.get(n).double()) ** 2).sum()) for n in names)
    norm = sum(float((b.get(n).double() ** 2).sum()) for n in names)
    return (diff / norm) ** 0.5


def run(args) -> list[dict]:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    average = [f"phema:sigma_rel=0.05/0.10,every={args.every}"] + [f"power_ema:sigma_rel={s}" for s in SIGMA_RELS]
    config = TrainConfig(preset=args.preset, steps=args.steps, lr=args.lr, warmup_steps=args.warmup,
                         save_every=args.steps, seed=args.seed, average=average)
    train(config, work / "run", progress=False)
    final = work / "run" / f"step-{args.steps:06d}"
    tracked = dict(zip(SIGMA_RELS, averager_names(average)[1:]))
    windows = eval_windows(load_tokens("shakespeare-val"), n_tokens=args.eval_tokens, context=config.seq_len)
    rows = [{"model": "raw (final step)", "loss": evaluate_model(load_model(final), windows).loss}]
    stored = {s: work / "run" / "phema" / f"sigma_rel-{s:.3f}-step-{args.steps:06d}" for s in (0.05, 0.10)}
    for sigma_rel in SIGMA_RELS:
        out = work / f"posthoc-{sigma_rel}"
        result = run_recipe(MergeRecipe(inputs=[str(work / "run" / "phema")], output=str(out),
                                        schedule=f"phema:sigma_rel={sigma_rel}", force=True), progress=False)
        fit = result.manifest["recipe"]["posthoc_fit"]
        direct = final / tracked[sigma_rel]
        rows.append({"sigma_rel": sigma_rel, "tracked": evaluate_model(load_model(direct), windows).loss,
                     "posthoc": evaluate_model(load_model(out), windows).loss,
                     "distance": relative_distance(out, direct), "residual": fit["relative_residual"],
                     "stored_distance": min(relative_distance(s, direct) for s in stored.values()),
                     "coefficient_sum": fit["coefficient_sum"]})
    for sigma_rel, path in stored.items():
        rows.append({"model": f"stored snapshot {sigma_rel}", "loss": evaluate_model(load_model(path), windows).loss})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| sigma_rel | tracked EMA loss | post-hoc loss | post-hoc - tracked | distance to tracked: post-hoc "
          "| nearest stored snapshot | fit residual |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in rows if "sigma_rel" in r):
        print(f"| {r['sigma_rel']:.2f} | {r['tracked']:.4f} | {r['posthoc']:.4f} | {r['posthoc'] - r['tracked']:+.4f} "
              f"| {r['distance']:.2e} | {r['stored_distance']:.2e} | {r['residual']:.3f} |")
    for r in (r for r in rows if "model" in r):
        print(f"| {r['model']} | {r['loss']:.4f} | | | | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=20, help="phema snapshot spacing in steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--work", default="benchmarks/_work/posthoc_ema")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    rows = run(args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")
    assert all(np.isfinite(r.get("posthoc", 0.0)) for r in rows)


if __name__ == "__main__":
    main()
