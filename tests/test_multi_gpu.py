"""Two GPUs: every launch runs on the gradients' device, whichever device is current.

Triton launches on the *current* CUDA device. Without a device guard, gradients on cuda:1
while cuda:0 is current fail to launch (no peer access) or, once peer access is on, are
read over the link from the wrong GPU, unordered with cuda:1's backward. These tests make
cuda:0 current and put the gradients elsewhere. They skip on a machine with one GPU.
"""
import pytest
import torch
from helpers import clone_params, make_params

import gradstats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

SIZES = [1000, 33, 70000]


@pytest.fixture(autouse=True)
def _triton_backend_cuda0_current(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "triton")
    torch.cuda.set_device(0)


def _clip_matches_torch(params, max_norm):
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, max_norm)
    total = gradstats.fused_clip_grad_norm_(params, max_norm)
    assert total.device == expected.device
    rtol = 1e-5 if total.dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(total, expected, rtol=rtol, atol=0)
    for got, want in zip(params, expected_params):
        torch.testing.assert_close(got.grad, want.grad, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_on_the_second_gpu_while_the_first_is_current(dtype):
    params = make_params(SIZES, dtype, "cuda:1")
    _clip_matches_torch(params, 0.5)
    assert torch.cuda.current_device() == 0  # the guard restores the caller's device
    stats = gradstats.grad_stats(params, histogram=True)
    assert stats.norms.device == torch.device("cuda:1")
    reference = torch.stack([p.grad.double().norm() for p in params])
    torch.testing.assert_close(stats.norms.double(), reference, rtol=1e-4, atol=0)
    assert stats.hist.sum().item() == sum(SIZES)


def test_second_gpu_with_peer_access_on():
    # A copy between the two GPUs turns peer access on; the kernels must still run on cuda:1.
    params = make_params(SIZES, torch.float32, "cuda:1")
    params[0].grad.to("cuda:0")
    _clip_matches_torch(params, 0.5)


def test_gradients_spread_over_two_gpus():
    params = make_params(SIZES, torch.float32, "cuda:0") + make_params(SIZES, torch.float32,
                                                                       "cuda:1")
    _clip_matches_torch(params, 0.5)


def test_gradients_on_the_second_gpu_are_ordered_after_its_stream():
    # Work queued on cuda:1's current stream (here: filling the gradients) must be done
    # before the statistics read them: the launch goes to that device's current stream.
    params = make_params([1 << 20], torch.float32, "cuda:1")
    with torch.cuda.device(1):
        torch.cuda._sleep(10_000_000)  # keep cuda:1's stream busy
        params[0].grad.fill_(2.0)
    total = gradstats.get_total_norm([p.grad for p in params])
    assert total.item() == pytest.approx(2.0 * (1 << 10), rel=1e-5)
