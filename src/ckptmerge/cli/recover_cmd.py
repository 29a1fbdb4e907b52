"""``ckptmerge recover``: restart a run after a loss spike from the SMA of its last pre-spike checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from ckptmerge.cli.deprecated import add_renamed
from ckptmerge.io.remote import refuse_urls


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recover", help="PMA-init: restart after a loss spike from the SMA of pre-spike checkpoints")
    p.add_argument("run_dir", help="a ckptmerge training run (run.json, metrics.jsonl, step-* checkpoints)")
    p.add_argument("--last", type=int, default=3, help="merge the last N checkpoints before the spike (default 3)")
    add_renamed(p, "--n", "--last")
    p.add_argument("--optimizer-state", choices=("keep", "reset"), default="keep",
                   help="Adam state of the last pre-spike checkpoint: keep it or start from zero moments")
    p.add_argument("--spike-step", type=int, help="restart before this step instead of the first detected spike")
    p.add_argument("--max-steps", type=int, help="train the restart up to this step (default: the run's length)")
    add_renamed(p, "--steps", "--max-steps")
    p.add_argument("--baseline", action="store_true", help="also restart from the last pre-spike checkpoint, unmerged")
    p.add_argument("--window", type=int, default=50, help="spike detector: trailing log records (default 50)")
    p.add_argument("--loss-jump", type=float, default=0.3, help="spike: loss this many nats above the trailing median")
    p.add_argument("--grad-factor", type=float, default=10.0, help="spike: grad norm this many times its trailing median")
    p.add_argument("-o", "--output", help="output folder (default RUN_DIR-recover next to the run)")
    add_renamed(p, "--out", "--output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ckptmerge.recovery.recover import RecoverConfig, recover  # the trainer: only this command's start-up

    cfg = RecoverConfig(n=args.last, optimizer_state=args.optimizer_state, spike_step=args.spike_step,
                        steps=args.max_steps,
                        baseline=args.baseline, window=args.window, loss_jump=args.loss_jump,
                        grad_factor=args.grad_factor)
    refuse_urls("recover", "it restarts a local ckptmerge training run; `ckptmerge merge URL --last N -o OUT` merges "
                "the pre-spike checkpoints of a run at a URL", run_dir=args.run_dir, **{"-o": args.output})
    run_dir = Path(args.run_dir)
    out = Path(args.output) if args.output else run_dir.resolve().parent / f"{run_dir.resolve().name}-recover"
    result = recover(run_dir, cfg, out, progress=not args.quiet)
    for name, loss in result.final_loss.items():
        print(f"{name}: final training loss {loss:.4f}, spikes after the restart: {len(result.spikes_after[name])}")
    print(f"details: {out / 'recover.json'}")
    return 0
