"""Try designs that make the `tiny` model's training loss spike, and report where the spike rule fires.

    nice -n 19 python scripts/spike_designs.py --steps 250 --batch-size 8 --seeds 0 1 2 --design all

Each design trains the reproduction's model (`tiny`, context 64) with the trainer's own step
(`train/loop.py`: AdamW (0.9, 0.95), wd 0.1) and feeds every step's training loss to the spike rule
fixed in advance (`recovery/spikes.py` SmoothedRise: the 10-step mean 0.5 nats above its running
minimum, or a non-finite loss). Designs (LR0 = `--lr`, the tuned LR):

- `const8`, `const32`: constant LR 8x / 32x LR0 from a 2-step warm-up, clipping off (the old design; PMA's
  "trained from scratch at a high LR").
- `eps`: `const8` with Adam epsilon 1e-12 instead of 1e-8.
- `surge`: LR0 (warm-up 2.5% of the steps) until `--at` (a healthy run), then `--factor` x LR0 for
  `--surge-steps` steps, then LR0 again: a controlled spike at a known step. Clipping off (`--clip-before
  1.0` clips before the surge only).
- `poison`: LR0 as in `surge`; for `--surge-steps` steps from `--at` the batch is one byte repeated
  (a poisoned batch); the rule is fed the normal steps' losses only.

Per design and seed it prints the step the rule fired (or none), the 10-step mean loss before the
surge, its peak after, and at the end ("recovered" when the end is within 0.5 nats of the pre-spike
mean). Numbers, not plots; a JSON line per run with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from ckptmerge.data.batches import train_batch
from ckptmerge.data.tokens import load_tokens
from ckptmerge.recovery.spikes import SmoothedRise
from ckptmerge.reproduce.training import SPIKE_RISE, SPIKE_SMOOTH
from ckptmerge.train.config import TrainConfig
from ckptmerge.train.loop import clip_gradients, make_optimizer
from ckptmerge.train.presets import build_model

DESIGNS = ("const8", "const32", "eps", "surge", "poison")


def plan(design: str, args) -> tuple[callable, float, callable, float]:
    """(lr(step), clip(step), poisoned(step), adam eps) of a design; steps count from 0."""
    lr0, at, k = args.lr, args.at, args.surge_steps
    warm = lambda peak: (lambda s: peak * min(1.0, (s + 1) / 2))
    if design in ("const8", "const32", "eps"):
        factor = 32.0 if design == "const32" else 8.0
        return warm(factor * lr0), lambda s: 0.0, lambda s: False, 1e-12 if design == "eps" else 1e-8
    base_warm = max(2, round(0.025 * args.steps))
    base = lambda s: lr0 * min(1.0, (s + 1) / base_warm)
    if design == "surge":
        return (lambda s: args.factor * lr0 if at <= s < at + k else base(s),
                lambda s: args.clip_before if s < at else 0.0, lambda s: False, 1e-8)
    return base, lambda s: args.clip_before if s < at else 0.0, lambda s: at <= s < at + k, 1e-8


def run(design: str, seed: int, tokens, args) -> dict:
    torch.manual_seed(seed)
    lr_at, clip_at, poisoned, eps = plan(design, args)
    config = TrainConfig(preset="tiny", steps=args.steps, lr=args.lr, batch_size=args.batch_size, context=64,
                         seed=seed)
    model = build_model("tiny", seed)
    opt = make_optimizer(model, config)
    for group in opt.param_groups:
        group["eps"] = eps
    rule, losses = SmoothedRise(SPIKE_SMOOTH, SPIKE_RISE), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = train_batch(tokens, seed=seed, step=step, micro=0, batch_size=args.batch_size, context=64)
        if poisoned(step):
            x, y = torch.full_like(x, int(x[0, 0])), torch.full_like(y, (int(x[0, 0]) + 1) % 256)
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        clip_gradients(model.parameters(), clip_at(step))
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if not poisoned(step):
            losses.append((step + 1, value))
            rule.update(step + 1, value)
        if not math.isfinite(value):
            break
    mean = lambda a, b: sum(v if math.isfinite(v) else math.log(256) for s, v in losses if a < s <= b) / max(
        1, sum(1 for s, _ in losses if a < s <= b))
    before = mean(args.at - SPIKE_SMOOTH, args.at)
    peak = max((mean(s - SPIKE_SMOOTH, s) for s, _ in losses if s > args.at), default=float("nan"))
    end = mean(args.steps - SPIKE_SMOOTH, args.steps)
    return {"design": design, "seed": seed, "fired": rule.fired_step, "before": round(before, 3),
            "peak": round(peak, 3), "end": round(end, 3), "recovered": end - before < SPIKE_RISE,
            "steps": len(losses)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--design", nargs="+", default=["all"], help=f"{', '.join(DESIGNS)} or all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-3, help="LR0, the base LR (the sweeps picked 0.004 at --scale test, 0.001 at --quick, 0.002 at full)")
    p.add_argument("--at", type=int, default=150, help="first surge / poison step")
    p.add_argument("--surge-steps", type=int, default=20)
    p.add_argument("--factor", type=float, default=30.0, help="surge LR = factor x LR0")
    p.add_argument("--clip-before", type=float, default=0.0, help="gradient clipping before --at (0: off)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    tokens = load_tokens("shakespeare")
    designs = DESIGNS if "all" in args.design else args.design
    for design in designs:
        for seed in args.seeds:
            began = time.monotonic()
            r = run(design, seed, tokens, args)
            r["seconds"] = round(time.monotonic() - began, 1)
            print(json.dumps(r) if args.json else
                  f"{design:8s} seed {seed}: fired at {r['fired']}, 10-step mean before {r['before']:.3f}, "
                  f"peak {r['peak']:.3f}, end {r['end']:.3f} ({'recovered' if r['recovered'] else 'not recovered'}),"
                  f" {r['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
