"""Device paths (run only where CUDA is available): in-memory merge on GPU, EMA offloaded to pinned CPU memory."""

import pytest
import torch
from conftest import make_state

from ckptmerge.merging.memory import merge_state_dicts
from ckptmerge.online import EMA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_in_memory_merge_on_gpu_equals_cpu():
    states = [make_state(seed) for seed in range(3)]
    coeffs = [0.2, 0.3, 0.5]
    cpu = merge_state_dicts(states, coeffs)
    gpu = merge_state_dicts([{k: v.cuda() for k, v in s.items()} for s in states], coeffs)
    for name, value in cpu.items():
        assert gpu[name].is_cuda
        torch.testing.assert_close(gpu[name].cpu(), value, rtol=1e-6, atol=1e-7)


def test_offloaded_ema_of_a_gpu_model_equals_on_device_ema():
    model = torch.nn.Linear(64, 64).cuda()
    on_device, offloaded = EMA(0.9), EMA(0.9, offload=True)
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(0.01 * step)
        on_device.update(model, step)
        offloaded.update(model, step)
    a, b = on_device.averaged_state_dict(), offloaded.averaged_state_dict()
    assert b["weight"].device.type == "cpu" and a["weight"].is_cuda
    torch.testing.assert_close(b["weight"], a["weight"].cpu(), rtol=1e-6, atol=1e-7)
