"""``grad_clip <= 0`` turns clipping off (gradients untouched, norm still measured); a positive value clips."""

import numpy as np
import pytest
import torch

from ckptmerge.train.trainer import clip_gradients


def _params():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    return params


@pytest.mark.parametrize("off", [0.0, -1.0])
def test_zero_turns_clipping_off(off):
    params = _params()
    before = [p.grad.numpy().astype(np.float64).copy() for p in params]
    norm = clip_gradients(params, off)
    assert norm == pytest.approx(np.sqrt(sum((g ** 2).sum() for g in before)), rel=1e-6)
    for p, g in zip(params, before):
        np.testing.assert_array_equal(p.grad.numpy(), g.astype(np.float32))


def test_positive_value_clips_to_that_norm():
    params = _params()
    before = [p.grad.numpy().astype(np.float64).copy() for p in params]
    total = np.sqrt(sum((g ** 2).sum() for g in before))
    assert clip_gradients(params, 1.0) == pytest.approx(total, rel=1e-6)
    after = np.sqrt(sum((p.grad.numpy().astype(np.float64) ** 2).sum() for p in params))
    assert after == pytest.approx(1.0, rel=1e-4)
