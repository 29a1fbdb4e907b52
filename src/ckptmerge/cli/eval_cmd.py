"""``ckptmerge eval PATH... --data D...``: held-out loss of HF causal-LM folders on fixed windows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ckptmerge.console import print_table
from ckptmerge.data.corpora import HELD_OUT
from ckptmerge.evaluation.runner import evaluate_paths
from ckptmerge.parallel.agree import phase
from ckptmerge.parallel.world import rank


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out loss / perplexity of model folders, with standard errors")
    p.add_argument("paths", nargs="+", help="HF causal-LM folders (raw checkpoints, merges, your own)")
    p.add_argument("--data", action="append", help=f"domain or file, repeatable (default: {', '.join(HELD_OUT)})")
    p.add_argument("--tokens", type=int, default=32768, help="tokens scored per data set (default 32768)")
    p.add_argument("--context", type=int, help="window length (default: the model's max positions, at most 1024)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    p.add_argument("--device-map", choices=("auto",), help="auto: spread a model larger than one device over all "
                   "devices (accelerate)")
    p.add_argument("--json", help="write results to this JSON file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    data = args.data or list(HELD_OUT)
    results = None
    with phase():  # torchrun: the windows are split across ranks; an error is reported once
        results = evaluate_paths([Path(p) for p in args.paths], data, n_tokens=args.tokens, context=args.context,
                                 batch_size=args.batch_size, bf16=args.bf16, device_map=args.device_map)
    if rank() != 0:  # every rank holds the gathered results; rank 0 reports them
        return 0
    rows = [[path] + [f"{r.loss:.4f} ± {r.stderr:.4f}" for r in by_data.values()] for path, by_data in results.items()]
    print_table(["model", *data], rows, note="loss in nats per token (± standard error over windows)")
    if args.json:
        Path(args.json).write_text(json.dumps({p: {d: r.to_dict() for d, r in v.items()} for p, v in results.items()},
                                              indent=2) + "\n")
    return 0
