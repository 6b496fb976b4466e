"""GPU-only checks: real compiled kernels, huge tensors, CUDA graphs, no host syncs.

The dtype/norm/edge-case battery of the other test files also runs on CUDA through the
``backend_device`` fixture; these are the cases that only make sense on a GPU.
"""
import math

import pytest
import torch
from helpers import clone_params, make_params

import gradstats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "triton")


def test_tensor_over_2_31_elements():
    numel = 2**31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 3 * numel * 2:
        pytest.skip("not enough GPU memory")
    grad = torch.ones(numel, dtype=torch.float16, device="cuda")
    grad[-1] = 2.0  # past the int32 range
    grad[2**31 + 7] = float("nan")
    param = torch.nn.Parameter(torch.empty(0, device="cuda"))
    param.data = torch.empty_like(grad)
    param.grad = grad
    stats = gradstats.grad_stats([param], histogram=True)
    assert stats.nonfinite.item() == 1
    assert stats.hist[0].sum().item() == numel - 1
    assert stats.numel.item() == numel
    grad[2**31 + 7] = 1.0
    total = gradstats.fused_clip_grad_norm_([param], 1.0)
    assert total.item() == pytest.approx(math.sqrt(numel - 1 + 4), rel=1e-3)
    assert grad[-1].item() == pytest.approx(2.0 / math.sqrt(numel + 3), rel=1e-2)
    del param, grad, stats
    torch.cuda.empty_cache()


def test_whole_clip_captured_in_a_cuda_graph():
    params = make_params([1000, 33, 70000], torch.float32, "cuda")
    static_grads = [p.grad for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gradstats.fused_clip_grad_norm_(params, 1.0)  # warm-up: compiles, caches the plan
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = gradstats.fused_clip_grad_norm_(params, 1.0)
    for scale in (10.0, 1e-4):  # clipping needed, then not needed
        fresh = [torch.randn_like(g) * scale for g in static_grads]
        for g, new in zip(static_grads, fresh):
            g.copy_(new)
        twins = clone_params(params)
        graph.replay()
        expected = torch.nn.utils.clip_grad_norm_(twins, 1.0)
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
        for param, twin in zip(params, twins):
            torch.testing.assert_close(param.grad, twin.grad, rtol=1e-5, atol=1e-8)


def test_capture_without_warm_up_is_a_clear_error():
    params = make_params([100], torch.float32, "cuda")
    gradstats.worklist.clear_plan_cache()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Run the same call once before capturing"):
        with torch.cuda.graph(graph):
            gradstats.fused_clip_grad_norm_(params, 1.0)


def test_no_host_sync_on_the_hot_path():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
    model(torch.randn(4, 64, device="cuda")).sum().backward()
    gradstats.grad_stats(model, max_norm=1.0)  # first call builds and caches the plan
    gradstats.fused_clip_grad_norm_(model.parameters(), 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gradstats.grad_stats(model, max_norm=1.0)
        gradstats.fused_clip_grad_norm_(model.parameters(), 1.0)
        gradstats.get_total_norm([p.grad for p in model.parameters()])
        gradstats.clip_grad_value_(model.parameters(), 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_no_clipping_needed_writes_nothing():
    params = make_params([5000], torch.float32, "cuda")
    grad = params[0].grad
    before = grad.clone()
    gradstats.fused_clip_grad_norm_(params, 1e9)
    assert torch.equal(grad, before)


class _CountingSink:
    def __init__(self):
        self.steps = []

    def write(self, record):
        self.steps.append(record.step)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "adam-fused"])
def test_monitor_steps_never_sync(tmp_path, fused):
    """Statistics, histograms, clipping, the NaN alarm and (with a fused optimizer) "skip"
    all run without the host waiting for the GPU; records land at later steps."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
    optimizer = (torch.optim.Adam(model.parameters(), fused=True) if fused
                 else torch.optim.SGD(model.parameters(), lr=0.1))
    sink = _CountingSink()
    monitor = gradstats.GradMonitor(model, hist_every=2, optimizer=optimizer if fused else None,
                                    on_nonfinite="skip" if fused else "warn",
                                    sinks=[sink, f"jsonl:{tmp_path}/g.jsonl"])
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):  # warm-up: plans, pinned buffers, kernels
        model(x).sum().backward()
        monitor.step(max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            model(x).sum().backward()
            monitor.step(max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monitor.close()
    assert sink.steps == list(range(6))
