"""``ckptmerge search``: choose merge weights by Bayesian optimization of held-out loss."""

from __future__ import annotations

import argparse
from pathlib import Path

from ckptmerge.cli.deprecated import add_renamed
from ckptmerge.cli.eval_flags import add_eval_flags, settings_from_args
from ckptmerge.cli.storage_flags import add_storage_flags
from ckptmerge.console import print_table
from ckptmerge.io.remote import refuse_urls
from ckptmerge.search.storage import DEFAULT_HEARTBEAT_S


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="tune merge weights on held-out loss (Optuna GP by default)")
    p.add_argument("inputs", nargs="+", help="a run directory, or checkpoint folders")
    p.add_argument("--last", type=int, help="window: the last N checkpoints (pair uses the two newest)")
    p.add_argument("--every", type=int, help="window spacing in steps")
    p.add_argument("--space", choices=("pair", "simplex", "schedule", "phema"), default="pair",
                   help="phema: sigma_rel of the post-hoc EMA of a folder of power-EMA snapshots (docs/posthoc-ema.md)")
    p.add_argument("--min-lambda", type=float, default=0.0, help="pair: lower bound of lambda (default 0)")
    add_renamed(p, "--alpha", "--min-lambda")
    p.add_argument("--data", default="shakespeare-val", help="tuning data: domain or file")
    p.add_argument("--report-data", action="append", default=[], help="other domains to report, repeatable")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens per evaluation")
    p.add_argument("--trials", type=int, default=20, help="finished trials in the study (COMPLETE, and PRUNED with "
                   "--prune-after), baselines included; failed and killed trials do not count")
    p.add_argument("--sampler", choices=("gp", "gp-hedge", "tpe", "random"), default="gp",
                   help="gp: Optuna's GPSampler (logEI); gp-hedge: the paper's EI/PI/UCB portfolio on Optuna's GP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prune-after", type=int, default=0,
                   help="prune a trial after this many eval batches if it is clearly worse than the best (0: off)")
    p.add_argument("--prune-margin", type=float, default=0.02, help="relative margin for pruning (default 0.02)")
    p.add_argument("--storage", help="Optuna storage: sqlite:///study.db, postgresql://user@host/db, "
                   "mysql+pymysql://..., or journal:///shared/study.log; workers on any machine run the same command")
    p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S,
                   help="seconds between a running trial's heartbeats on a database; a trial silent for 3x this "
                        "is failed and re-queued (default %(default)s)")
    p.add_argument("--study", default="ckptmerge-search", help="study name in the storage")
    p.add_argument("--workers", type=int, default=1, help="local worker processes on one study")
    p.add_argument("-o", "--output", help="write the best merge here (atomic merge path, merge.json records the search)")
    p.add_argument("--force", action="store_true", help="replace an existing -o folder")
    p.add_argument("--json", help="write all trials and the generalization table here")
    p.add_argument("--plots", help="folder for loss_vs_lambda.png (pair) and best_weights.png")
    p.add_argument("--objective", default="loss",
                   help="what to minimise: loss (nats/token, default), bits_per_byte, or lm-eval:TASK:METRIC "
                        "(maximised; needs ckptmerge[lm-eval])")
    p.add_argument("--lm-eval-include", action="append", default=[], help="folder of extra lm-eval task YAMLs")
    p.add_argument("--lm-eval-limit", type=int, help="lm-eval objective: at most this many documents")
    add_eval_flags(p)
    add_storage_flags(p)  # for --data / --tokenizer URLs
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the library loads here, not when the CLI starts (ckptmerge --help imports no torch)
    from ckptmerge.merging.recipe import MergeRecipe
    from ckptmerge.merging.window import resolve_window
    from ckptmerge.search.run import SEARCH_URLS, search, write_results
    from ckptmerge.search.study import SearchConfig

    refuse_urls("search", SEARCH_URLS, checkpoint=args.inputs, **{"-o": args.output, "--plots": args.plots,
                                                                  "--json": args.json})
    schedule = "phema:sigma_rel=0.1" if args.space == "phema" else "sma"  # the window's own weights go unused
    window = resolve_window(MergeRecipe(inputs=args.inputs, last=args.last, every=args.every, schedule=schedule))
    cfg = SearchConfig(space=args.space, data=args.data, trials=args.trials, sampler=args.sampler, seed=args.seed,
                       storage=args.storage, study_name=args.study, min_lambda=args.min_lambda,
                       prune_after=args.prune_after, prune_margin=args.prune_margin, objective=args.objective,
                       lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit,
                       heartbeat_s=args.heartbeat)
    result = search(window.refs, cfg, n_tokens=args.tokens, workers=args.workers, output=args.output,
                    report_data=args.report_data, plots=args.plots, log=print, settings=settings_from_args(args),
                    force=args.force)
    unit = {"loss": "nats/token", "bits_per_byte": "bits/byte"}.get(args.objective, f"-({args.objective})")
    print(f"best: {unit} {result.best_loss:.5f} with weights {[round(w, 4) for w in result.best_weights]} "
          f"(oldest first) after {len(result.trials)} trials")
    rows = [[data, name, f"{r['loss']:.5f}", f"{r['diff_vs_searched']:+.5f} ± {r['se']:.5f}"]
            for data, by_name in result.generalization.items() for name, r in by_name.items()]
    unit = "bits per byte" if args.objective == "bits_per_byte" else "nats per token"
    print_table(["data", "candidate", "loss", "Δ vs searched"], rows, note=f"loss in {unit}")
    if args.json:
        write_results(Path(args.json), result)
    return 0
