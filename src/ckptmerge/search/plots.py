"""Search plots: loss vs lambda (pair) with a Gaussian-process mean and band, and the best weights.

The band comes from a small GP fitted here for display: RBF kernel on standardized losses, its
length-scale chosen by marginal likelihood over a grid. It shows what the trials imply about the
curve, and it is not Optuna's internal model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def gp_posterior(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and standard deviation on ``grid`` (RBF, noise 1e-6, length-scale by evidence)."""
    mu, sd = y.mean(), y.std() or 1.0
    z = (y - mu) / sd
    best = None
    for length in np.logspace(-2, 0.5, 40):
        k = np.exp(-0.5 * ((x[:, None] - x[None, :]) / length) ** 2) + 1e-6 * np.eye(len(x))
        chol = np.linalg.cholesky(k)
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
        evidence = -0.5 * z @ alpha - np.log(np.diag(chol)).sum()
        if best is None or evidence > best[0]:
            best = (evidence, length, chol, alpha)
    _, length, chol, alpha = best
    k_star = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / length) ** 2)
    v = np.linalg.solve(chol, k_star.T)
    var = np.clip(1.0 - (v * v).sum(axis=0), 0.0, None)
    return mu + sd * (k_star @ alpha), sd * np.sqrt(var)


def plot_pair(trials: list[dict], path: Path, min_lambda: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = np.array([t["weights"][1] for t in trials])
    loss = np.array([t["loss"] for t in trials])
    order = np.unique(lam, return_index=True)[1]  # repeated lambdas would make the kernel singular
    grid = np.linspace(min_lambda, 1.0, 200)
    mean, sd = gp_posterior(lam[order], loss[order], grid)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.fill_between(grid, mean - 2 * sd, mean + 2 * sd, alpha=0.2, label="GP mean ± 2 sd (display fit)")
    ax.plot(grid, mean, color="tab:blue")
    ax.scatter(lam, loss, color="black", zorder=3, label="trials")
    best = int(np.argmin(loss))
    ax.scatter([lam[best]], [loss[best]], color="tab:red", s=80, zorder=4, label=f"best: lambda = {lam[best]:.3f}")
    ax.set_xlabel("lambda (weight on the newer checkpoint)")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(weights: list[float], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(weights)), weights, color="tab:green")
    ax.set_xticks(range(len(weights)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("merge weight")
    ax.set_title("best weights found (oldest first)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
