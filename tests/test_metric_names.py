"""Metric / objective names: loss and bits_per_byte; any other name is refused in one line, never scored as loss."""

import numpy as np
import pytest

from ckptmerge.errors import ConfigError
from ckptmerge.evaluation.evaluator import summarize


def test_an_unknown_metric_name_is_an_error_not_the_loss():
    result = summarize("d", np.array([2.0, 3.0]), np.array([10, 10]), n_bytes=40)
    assert result.metric("loss") == 2.5
    assert result.metric("bits_per_byte") == pytest.approx(2.5 * 20 / (40 * np.log(2)))
    with pytest.raises(ConfigError) as err:
        result.metric("perplexity")
    assert "\n" not in str(err.value) and "'perplexity'" in str(err.value) and "loss, bits_per_byte" in str(err.value)


def test_sweep_refuses_an_unknown_objective_before_any_work(tmp_path):
    from ckptmerge.sweep.run import SweepConfig, sweep

    with pytest.raises(ConfigError, match="--objective 'bpb'.*loss, bits_per_byte"):
        sweep(tmp_path / "no-run-here", SweepConfig(objective="bpb"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
