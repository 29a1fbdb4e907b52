"""Evaluation windows never overlap, and a short file is scored token by token exactly once."""

import numpy as np
import pytest

from ckptmerge.data.batches import PAD, eval_windows


def _scored_positions(tokens_len: int, windows) -> list[int]:
    """Positions of the scored targets, recovered from token values (tokens are arange, so value = position)."""
    targets = windows[:, 1:].numpy()
    return sorted(int(t) for t in targets[targets != PAD])


@pytest.mark.parametrize("length,n_tokens,context", [(100, 1000, 16), (1000, 800, 16), (50, 64, 64), (170, 160, 16)])
def test_scored_targets_are_disjoint(length, n_tokens, context):
    tokens = np.arange(length, dtype=np.int64)
    windows = eval_windows(tokens, n_tokens=n_tokens, context=context)
    scored = _scored_positions(length, windows)
    assert len(scored) == len(set(scored))  # no token scored twice
    if length - 1 <= n_tokens:  # too short for the request: every token after the first, once
        assert scored == list(range(1, length))
    else:
        assert len(scored) == max(1, n_tokens // context) * context


def test_long_data_keeps_evenly_spaced_windows():
    tokens = np.arange(10_000, dtype=np.int64)
    windows = eval_windows(tokens, n_tokens=640, context=64)
    starts = windows[:, 0].numpy()
    assert list(starts) == list(np.linspace(0, 10_000 - 65, 10).round().astype(int))


def test_weighted_mean_and_se_match_numpy():
    from ckptmerge.evaluation.evaluator import summarize

    rng = np.random.default_rng(0)
    losses, counts = rng.normal(3, 0.2, 9), np.array([16] * 8 + [5])
    r = summarize("d", losses, counts)
    total = (losses * counts).sum()
    assert r.loss == pytest.approx(total / counts.sum()) and r.tokens == counts.sum()
    equal = summarize("d", losses, np.full(9, 16))
    assert equal.stderr == pytest.approx(losses.std(ddof=1) / np.sqrt(9))
