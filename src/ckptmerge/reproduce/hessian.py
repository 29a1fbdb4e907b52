"""E11: the Hessian cross term between checkpoint deviations from their merge (PMA's mechanism).

For checkpoints theta_1..theta_N with merge theta_bar and deviations delta_i = theta_i - theta_bar,
C = sum_{i != j} delta_i^T H delta_j, H the Hessian of the held-out loss at theta_bar. Because the
deltas sum to 0, C = -sum_i delta_i^T H delta_i, and to second order the merge gain is
mean_i L(theta_i) - L(theta_bar) = -C / (2N). Hessian-vector products are exact (double backward).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ckptmerge.evaluation.scoring import merge_vectors
from ckptmerge.reproduce.context import LOSS_MARGIN, Context
from ckptmerge.reproduce.design import window
from ckptmerge.reproduce.halves import half
from ckptmerge.reproduce.pma import N_DEFAULT, WsdRun
from ckptmerge.reproduce.pma import setup as pma_setup
from ckptmerge.reproduce.report import Experiment, markdown_table
from ckptmerge.reproduce.stats import Claim

GROUPS = 4  # half-B windows are split into groups; the SE is over groups
PAPER = "Li et al., *Model Merging in Pre-training of Large Language Models* (PMA), 2025, Sec. 4.4"


def quad_forms(model: torch.nn.Module, center: torch.Tensor, deltas: list[torch.Tensor],
               windows: torch.Tensor) -> float:
    """sum_i delta_i^T H delta_i, H the Hessian of the mean next-token loss over ``windows`` at ``center``."""
    params = list(model.parameters())
    torch.nn.utils.vector_to_parameters(center, params)
    model.eval()
    logits = model(input_ids=windows[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    total = 0.0
    for i, delta in enumerate(deltas):
        hv = torch.autograd.grad(flat_grad @ delta, params, retain_graph=i < len(deltas) - 1)
        total += float(torch.cat([h.reshape(-1) for h in hv]) @ delta)
    return total


def cross_term(ctx: Context, run: str, steps: list[int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Per window group: C / (2N) and (measured gain - predicted gain); each (mean, SE over groups)."""
    snaps = [ctx.traj(run).snaps[t] for t in steps]
    center = merge_vectors(snaps, [1 / len(snaps)] * len(snaps))
    deltas = [s - center for s in snaps]
    windows = half(ctx.scorer.windows(ctx.in_domain), "B")
    model = ctx.scorer.model
    if getattr(model.config, "_attn_implementation", None) != "eager":
        model.config._attn_implementation = "eager"  # double backward through attention
    merged = half(ctx.merged(run, steps), "B")
    singles = np.mean([half(ctx.raw(run, t), "B") for t in steps], axis=0)
    crosses, residuals = [], []
    for idx in np.array_split(np.arange(len(windows)), GROUPS):
        q = quad_forms(model, center, deltas, windows[idx])
        cross = -q / (2 * len(steps))
        crosses.append(cross)
        residuals.append(float((singles[idx] - merged[idx]).mean()) + cross)  # measured - (-C/2N)
    n = len(crosses)
    return ((float(np.mean(crosses)), float(np.std(crosses, ddof=1) / n ** 0.5)),
            (float(np.mean(residuals)), float(np.std(residuals, ddof=1) / n ** 0.5)))


def e11(ctx: Context) -> Experiment:
    s = ctx.scale
    c = [Claim("E11a", "late in the stable phase the Hessian cross term is negative (merging helps)", "less",
               f"C / (2N) for SMA(N={N_DEFAULT}, V0) ending at the end of the stable phase", primary=True),
         Claim("E11b", "mid-way through the stable phase the cross term is negative", "less",
               f"C / (2N), N={N_DEFAULT}, V0, at 50% of the stable phase"),
         Claim("E11c", "the second-order prediction -C/(2N) matches the measured merge gain", "equivalent",
               "(mean_i L(theta_i) - L(theta_bar)) - (-C / (2N)), end of the stable phase")]
    rows = []
    for seed in s.seeds:
        run = WsdRun(ctx, seed)
        margin = LOSS_MARGIN * ctx.mean(run.raw(s.wsd_steps), "A")
        late, residual = cross_term(ctx, run.name, window(run.p["late"], N_DEFAULT, run.v))
        mid, _ = cross_term(ctx, run.name, window(run.p["mid"], N_DEFAULT, run.v))
        c[0].add(seed, late, margin)
        c[1].add(seed, mid, margin)
        c[2].add(seed, residual, margin)
        rows.append([seed, f"{mid[0]:+.4f} ± {mid[1]:.4f}", f"{late[0]:+.4f} ± {late[1]:.4f}",
                     f"{residual[0]:+.4f} ± {residual[1]:.4f}"])
    return Experiment("e11-hessian-cross-term", "E11: the Hessian cross term of merged checkpoints", PAPER,
                      "Merging helps when the checkpoints' deviations are complementary: the cross terms "
                      "delta_i^T H delta_j (i != j) are negative.",
                      pma_setup(ctx) + f" C is computed at the merge of N = {N_DEFAULT} checkpoints V0 apart with "
                      f"exact Hessian-vector products on the half-B windows in {GROUPS} groups (SE over groups). "
                      "With deviations taken from the merge, C = -sum_i delta_i^T H delta_i, so C < 0 says the "
                      "loss curves upward along the deviations and -C / (2N) is the second-order merge gain.", c,
                      [markdown_table(["seed", "C/(2N), mid", "C/(2N), late", "measured - predicted gain, late"],
                                      rows)], data={"rows": rows})
