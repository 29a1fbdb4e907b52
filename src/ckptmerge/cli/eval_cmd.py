"""``ckptmerge eval PATH... --data D...``: held-out loss of models on fixed windows, with their own tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ckptmerge.cli.eval_flags import add_eval_flags, settings_from_args
from ckptmerge.cli.storage_flags import add_storage_flags
from ckptmerge.console import print_table
from ckptmerge.data.corpora import HELD_OUT
from ckptmerge.io.remote import refuse_urls


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out loss (nats/token, bits/byte) of models, with standard errors")
    p.add_argument("paths", nargs="+", help="HF causal-LM folders (raw checkpoints, merges, your own), "
                                            "or raw .pt / DCP checkpoints with --model-config / --model-factory")
    p.add_argument("--data", action="append", help=f"domain, text / .jsonl / .parquet / token file or saved dataset "
                                                   f"folder, repeatable (default: {', '.join(HELD_OUT)})")
    p.add_argument("--tokens", type=int, default=32768, help="tokens scored per data set (default 32768)")
    p.add_argument("--context", type=int, help="window length (default: the model's max positions, at most 1024)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast over an fp32 model (see also --dtype)")
    p.add_argument("--lm-eval", help="also run lm-evaluation-harness tasks, comma list (needs ckptmerge[lm-eval])")
    p.add_argument("--lm-eval-include", action="append", default=[],
                   help="folder of extra lm-eval task YAMLs, repeatable")
    p.add_argument("--lm-eval-limit", type=int, help="lm-eval: at most this many documents per task")
    p.add_argument("--json", help="write results to this JSON file: {model: {data: {...}}}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_eval_flags(p)
    add_storage_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the library loads here, not when the CLI starts (ckptmerge --help imports no torch)
    from ckptmerge.evaluation.runner import evaluate_paths
    from ckptmerge.io.remote import as_location
    from ckptmerge.parallel.agree import phase
    from ckptmerge.parallel.world import rank

    refuse_urls("eval", "give --json a local file; lm-eval tasks need a local model folder",
                **{"--json": args.json, "--lm-eval model": args.paths if args.lm_eval else None})
    data = args.data or list(HELD_OUT)
    settings = settings_from_args(args, progress=not args.quiet)
    results = None
    with phase():  # torchrun: the windows are split across ranks; an error is reported once
        results = evaluate_paths([as_location(p) for p in args.paths], data, n_tokens=args.tokens, context=args.context,
                                 bf16=args.bf16, settings=settings)
    if rank() != 0:  # every rank holds the gathered results; rank 0 reports them
        return 0
    rows = [[path, d, f"{r.loss:.4f} ± {r.stderr:.4f}", r.bits_per_byte and f"{r.bits_per_byte:.4f}",
             f"{r.tokens:,}", f"{r.bytes:,}"] for path, by_data in results.items() for d, r in by_data.items()]
    print_table(["model", "data", "nats/token ± SE", "bits/byte", "tokens", "bytes"], rows,
                note="loss in nats per token (± standard error over windows); bits/byte = total nats / "
                     "(UTF-8 bytes of the scored text x ln 2)")
    for d, r in next(iter(results.values())).items():
        if r.short:
            print(f"note: {d} holds fewer tokens than --tokens {args.tokens}: every token was scored once "
                  f"({r.tokens:,} tokens)")
    report = {p: {d: r.to_dict() for d, r in v.items()} for p, v in results.items()}
    if args.lm_eval:
        from ckptmerge.evaluation.lm_eval_tasks import run_lm_eval

        tasks = [t for t in args.lm_eval.split(",") if t]
        for path in args.paths:
            scores = run_lm_eval(Path(path), tasks, settings=settings, include=args.lm_eval_include,
                                 limit=args.lm_eval_limit)
            report[str(Path(path))]["lm-eval"] = scores
            print_table(["model", "task", "metric", "value"],
                        [[path, t, m, v] for t, by_metric in scores.items() for m, v in by_metric.items()])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
