"""Per-step overhead of online averagers vs torch.optim.swa_utils.AveragedModel, updating every step.

For each preset: the median time of a training step (forward, backward, clip, AdamW) and, interleaved
on the same run, the median time of each averager's ``update`` (ours) or ``update_parameters``
(AveragedModel). Prints overhead as a share of the training step and the ratio to AveragedModel
for the same rule. Targets: EMA on ``small`` at most 3% of a step; no averager slower than
AveragedModel for the same rule.

    .venv/bin/python benchmarks/bench_online.py --presets tiny small --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ckptmerge.online import EMA, LAWA, PMA, SWA
from ckptmerge.train.presets import build_model, count_parameters, preset_context


def contenders(model):
    return {
        "EMA (ckptmerge)": EMA(0.999),
        "EMA (AveragedModel)": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999)),
        "SWA (ckptmerge)": SWA(start_step=0),
        "SWA (AveragedModel)": AveragedModel(model),
        "LAWA k=5 (ckptmerge)": LAWA(k=5, every=1),
        "PMA wma n=5 (ckptmerge)": PMA("wma", 5, every=1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    print("| preset | params | averager | update ms | share of a train step | vs AveragedModel |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        model = build_model(preset, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        context = preset_context(preset)
        avgs = contenders(model)
        step_s, update_s = [], {name: [] for name in avgs}
        for step in range(1, args.steps + 1):
            x = torch.randint(0, 256, (16, context + 1))
            start = time.perf_counter()
            loss = F.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - start)
            for name, avg in avgs.items():
                start = time.perf_counter()
                avg.update_parameters(model) if isinstance(avg, AveragedModel) else avg.update(model, step)
                update_s[name].append(time.perf_counter() - start)
        train = statistics.median(step_s[5:])
        for name, times in update_s.items():
            t = statistics.median(times[5:])
            rule = name.split(" (")[0]
            ref = update_s.get(f"{rule} (AveragedModel)")
            ratio = f"{t / statistics.median(ref[5:]):.2f}" if ref is not None and "ckptmerge" in name else "-"
            print(f"| {preset} | {count_parameters(model) / 1e6:.2f}M | {name} | {t * 1e3:.3f} | {t / train:.2%} | {ratio} |",
                  flush=True)
        print(f"| {preset} | | (training step) | {train * 1e3:.1f} | 100% | |")


if __name__ == "__main__":
    main()
