"""Scoring weights held in memory (``evaluation/scoring.py``): the fp64 merge of flat vectors and ``score_vector``,
each against an independent reference (fp64 NumPy; the model's own forward pass)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from ckptmerge.data.batches import eval_windows  # noqa: E402
from ckptmerge.data.tokens import load_tokens  # noqa: E402
from ckptmerge.evaluation.scoring import Scorer, merge_vectors  # noqa: E402
from ckptmerge.train.presets import build_model  # noqa: E402


def test_merge_vectors_is_the_fp64_sum_rounded_once_to_fp32():
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-3, 3) for _ in range(12)]
    coeffs = list(rng.dirichlet(np.ones(12)))
    reference = sum(c * v.astype(np.float64) for c, v in zip(coeffs, vectors))
    merged = merge_vectors([torch.from_numpy(v) for v in vectors], coeffs)
    assert merged.dtype == torch.float32
    # correctly rounded to fp32: within half an fp32 ulp of the fp64 sum (an fp32 accumulation is not)
    half_ulp = np.spacing(np.abs(reference).astype(np.float32)).astype(np.float64) / 2
    assert np.all(np.abs(merged.numpy().astype(np.float64) - reference) <= half_ulp * (1 + 1e-6))
    with pytest.raises(ValueError, match="one per vector"):
        merge_vectors([torch.from_numpy(vectors[0])], [0.5, 0.5])


def test_score_vector_gives_the_window_losses_of_the_models_own_forward_pass():
    torch.manual_seed(3)
    reference_model = build_model("tiny", 5)
    flat = torch.nn.utils.parameters_to_vector(reference_model.parameters()).detach().clone()
    scorer = Scorer.resident(build_model("tiny", 0), context=32, n_tokens=512, batch_size=4)
    result = scorer.score_vector(flat, "shakespeare-val")
    windows = eval_windows(load_tokens("shakespeare-val"), n_tokens=512, context=32)
    reference_model.eval()
    with torch.no_grad():
        logits = reference_model(input_ids=windows[:, :-1]).logits
        expected = F.cross_entropy(logits.transpose(1, 2).double(), windows[:, 1:], reduction="none").mean(dim=1)
    assert len(result.window_losses) == len(windows) == 16
    np.testing.assert_allclose(result.window_losses, expected.numpy(), rtol=1e-5)
    with pytest.raises(RuntimeError, match="Scorer.resident"):
        Scorer(n_tokens=512).score_vector(flat, "shakespeare-val")
