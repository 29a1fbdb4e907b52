"""Search never spends a trial on a point it has already scored (issue 24 item 5): the repeat is answered from
the study's record, the sampler is asked again, and ``--trials`` counts distinct points.

The objective here is a known fp64 function of the weights that counts its calls, so the test checks what the
search evaluated, independently of any model."""

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from ckptmerge.evaluation.evaluator import EvalResult  # noqa: E402
from ckptmerge.search.spaces import make_space  # noqa: E402
from ckptmerge.search.study import SearchConfig, open_study, run_trials, trial_rows  # noqa: E402

TARGET = np.array([0.2, 0.3, 0.5])


class CountingObjective:
    """Loss = squared distance of the weights to TARGET (fp64), one window; records every point it scores."""

    batch_size = 1

    def __init__(self):
        self.calls: list[list[float]] = []

    def windows(self, data):
        return [0]

    def __call__(self, coeffs, data, stop=None):
        self.calls.append(list(coeffs))
        loss = float(((np.asarray(coeffs, dtype=np.float64) - TARGET) ** 2).sum()) + 1.0
        return EvalResult(data, loss, 0.0, 10, [loss], 0, [10], None)


def _distinct(points, tol=1e-6) -> bool:
    return all(np.abs(np.subtract(a, b)).max() > tol for i, a in enumerate(points) for b in points[:i])


def test_a_repeated_point_is_answered_from_the_record_and_not_counted():
    space = make_space("simplex", 3)
    cfg = SearchConfig(space="simplex", data="d", trials=len(space.baselines()) + 3, sampler="random", seed=0)
    study = open_study(cfg, space)
    point = space.params_for([0.6, 0.3, 0.1])
    for _ in range(3):  # the sampler proposes one point three times (as GP did with [0, 0, 1] in the issue)
        study.enqueue_trial(point)
    study.enqueue_trial(space.params_for(list(TARGET)))
    objective = CountingObjective()
    lines = []
    run_trials(study, space, objective, cfg, log=lines.append)

    assert _distinct(objective.calls) and len(objective.calls) == cfg.trials  # every evaluation a new point
    rows = trial_rows(study)
    assert len(rows) == cfg.trials and _distinct([r["weights"] for r in rows])
    repeats = [t for t in study.trials if t.user_attrs.get("repeat_of") is not None]
    assert len(repeats) == 2
    original = study.trials[repeats[0].user_attrs["repeat_of"]]
    want = float(((np.array([0.6, 0.3, 0.1]) - TARGET) ** 2).sum()) + 1.0
    assert original.value == pytest.approx(want, rel=1e-12) and all(t.value == original.value for t in repeats)
    assert sum("already scored" in line for line in lines) == 2
    assert min(r["loss"] for r in rows) == pytest.approx(1.0, abs=1e-12)  # TARGET was still reached


def test_a_sampler_that_only_repeats_stops_with_a_warning():
    space = make_space("simplex", 3)
    cfg = SearchConfig(space="simplex", data="d", trials=len(space.baselines()) + 60, sampler="random", seed=0)
    study = open_study(cfg, space)
    for _ in range(cfg.trials + 5):
        study.enqueue_trial(space.params_for([0.0, 0.0, 1.0]))  # the "newest" baseline's point, over and over
    objective = CountingObjective()
    with pytest.warns(UserWarning, match="only points already scored"):
        run_trials(study, space, objective, cfg)
    assert _distinct(objective.calls) and len(objective.calls) == len(space.baselines())
