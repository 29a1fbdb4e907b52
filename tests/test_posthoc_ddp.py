"""PowerEMA and PowerEMASnapshots on 2 gloo ranks (DDP and FSDP2) against the fp64 closed form of one process.

``tests/sharded_runs.py`` (mode ``phema``) trains the same trajectory as its single-process reference; here the
saved power EMA and every saved snapshot are compared with the power EMA's weights written out by hand:
step s of a run at step t weighs (s^(g+1) - (s-1)^(g+1)) / t^(g+1) (EDM2), g found from sigma_rel by bisection.
"""

import socket

import pytest
import sharded_runs as runs
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_posthoc_ema import ref_gamma, ref_power_ema_weights

from ckptmerge.merging.discover import discover

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def ref_power_ema(history, step, sigma_rel):
    """The power EMA at ``step`` of the single-process weights ``history`` (one dict per step from 1), in fp64."""
    weights = ref_power_ema_weights(list(range(1, step + 1)), ref_gamma(sigma_rel))
    return {k: sum(w * h[k] for w, h in zip(weights, history)) for k in history[0]}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phema-ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(runs.worker, args=(runs.WORLD, port, str(folder), "phema"), nprocs=runs.WORLD, join=True)
    return folder


@pytest.fixture(scope="module")
def history():
    return [{k: v.detach().double().clone() for k, v in model.named_parameters()}
            for _, model in runs.single_process_run()]


def _assert_matches(saved, want, label):
    for name, value in want.items():
        torch.testing.assert_close(saved[name].double(), value, rtol=0, atol=1e-6, msg=f"{label}: {name}")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_power_ema_on_two_ranks_equals_the_single_process_closed_form(out, history, kind):
    saved = load_file(out / f"{kind}-power_ema-hf" / "model.safetensors")
    _assert_matches(saved, ref_power_ema(history, runs.STEPS, runs.POWER_SIGMA_REL), f"{kind} power_ema")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_phema_snapshots_on_two_ranks_equal_the_single_process_closed_form(out, history, kind):
    refs = discover(out / f"{kind}-phema").checkpoints
    every, sigmas = runs.PHEMA_EVERY, runs.PHEMA_SIGMA_RELS
    assert [r.step for r in refs] == [s for s in range(every, runs.STEPS + 1, every) for _ in sigmas]
    for ref in refs:
        sigma = next(s for s in sigmas if f"{s:.3f}" in ref.name)
        assert ref.ema_gamma == pytest.approx(ref_gamma(sigma), rel=1e-9)
        saved = load_file(ref.path / "model.safetensors")
        _assert_matches(saved, ref_power_ema(history, ref.step, sigma), f"{kind} {ref.name}")
