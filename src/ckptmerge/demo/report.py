"""Render the demo's report: a markdown table with verdicts computed from the numbers, and a PNG."""

from __future__ import annotations

from pathlib import Path

from ckptmerge.evaluation.evaluator import verdict


def render_markdown(report: dict) -> str:
    table, domains = report["table"], list(next(iter(report["table"].values())))
    labels = list(table)
    lines = ["# What merging gives this run", "",
             f"Held-out loss in nats per byte (± standard error over {next(iter(table[labels[0]].values()))['windows']} "
             f"windows); lower is better. All models see the same windows.", "",
             "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{table[label][d]['loss']:.4f} ± {table[label][d]['stderr']:.4f}"
                                                  for d in domains) + " |")
    lines += ["", "Differences are paired (same windows), so their standard errors are much smaller than the "
              "per-model ones.", "", "| model | " + " | ".join(f"Δ vs last, {d}" for d in domains) + " |",
              "|---|" + "---|" * len(domains)]
    for label, by_data in report["versus_last"].items():
        lines.append(f"| {label} | " + " | ".join(f"{c['diff']:+.4f} ± {c['se']:.4f}" for c in by_data.values()) + " |")
    lines += ["", "## Verdicts (computed: a difference counts when it exceeds 2 paired SE)", ""]
    lines += _verdicts(report)
    lines += ["", "![held-out loss vs step](loss_vs_step.png)", ""]
    return "\n".join(lines)


def _verdicts(report: dict) -> list[str]:
    d = report["in_domain"]
    labels = list(report["table"])
    last, annealed = labels[0], labels[-1]
    out = []
    for label in labels[1:-1]:
        vs_last = report["versus_last"][label][d]
        vs_anneal = report["versus_annealed"][label][d]
        out.append(f"- **{label}** is {verdict(vs_last['diff'], vs_last['se'], 'better than', 'worse than')} the "
                   f"{last} on {d} ({vs_last['diff']:+.4f} ± {vs_last['se']:.4f}), and "
                   f"{verdict(vs_anneal['diff'], vs_anneal['se'], 'better than', 'worse than')} the {annealed} "
                   f"({vs_anneal['diff']:+.4f} ± {vs_anneal['se']:.4f}).")
    anneal = report["versus_last"][annealed][d]
    out.append(f"- The **{annealed}** is {verdict(anneal['diff'], anneal['se'], 'better than', 'worse than')} the "
               f"{last} on {d} ({anneal['diff']:+.4f} ± {anneal['se']:.4f}).")
    return out


def plot_curves(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"stable": dict(color="tab:blue", marker=".", label="constant LR (raw checkpoints)"),
              "anneal": dict(color="tab:red", marker=".", label="anneal branch (LR -> 0)")}
    fork = report["config"]["steps"] - report["config"]["anneal_steps"]
    stable_at_fork = [p for p in report["curves"]["stable"] if p[0] == fork]
    for name, points in report["curves"].items():
        if name == "anneal":
            points = stable_at_fork + points  # the branch starts where it forked
        steps, losses = zip(*points) if points else ((), ())
        ax.plot(steps, losses, **styles.get(name, dict(color="tab:green", marker="o", label=name + " (merged)")))
    d, table = report["in_domain"], report["table"]
    final_step = report["config"]["steps"]
    offset = report["config"]["save_every"] * 0.3  # side by side, all at the final step
    for k, (label, marker) in enumerate(zip(list(table)[1:-1], ("*", "P", "X"))):
        ax.errorbar([final_step + (k - 1) * offset], [table[label][d]["loss"]], yerr=[table[label][d]["stderr"]],
                    fmt=marker, markersize=10, capsize=3, label=f"{label} of last {report['config']['merge_last']}, "
                                                                 f"step {final_step}")
    ax.axvline(fork, color="grey", linestyle=":", label=f"anneal fork (step {fork})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out loss on {d} (nats/byte)")
    ax.set_title("Merging constant-LR checkpoints vs annealing")
    lows = [p[1] for pts in report["curves"].values() for p in pts]
    if lows:
        ax.set_ylim(min(lows) - 0.05, min(lows) + 0.6)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
