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


def _replays_clip_like_torch(graph, total, params, static_grads):
    """Replays a captured clip on fresh gradients (clipping needed, then not needed) and
    compares with torch's eager clip of clones."""
    for scale in (10.0, 1e-4):
        for g in static_grads:
            g.copy_(torch.randn_like(g) * scale)
        twins = clone_params(params)
        graph.replay()
        expected = torch.nn.utils.clip_grad_norm_(twins, 1.0)
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
        for param, twin in zip(params, twins):
            torch.testing.assert_close(param.grad, twin.grad, rtol=1e-5, atol=1e-8)


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
    _replays_clip_like_torch(graph, total, params, static_grads)


def test_capture_without_warm_up_is_a_clear_error():
    params = make_params([100], torch.float32, "cuda")
    gradstats.worklist.clear_plan_cache()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Run the same call once before capturing"):
        with torch.cuda.graph(graph):
            gradstats.fused_clip_grad_norm_(params, 1.0)


def _warm_up_and_capture(call):
    """``call()`` once on a side stream (as torch.cuda.graphs recommends), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out, side


def _scribble_over_freed_memory(streams):
    """Allocate freed blocks back on ``streams`` and fill them with -1, so a kernel reading
    freed metadata would chase pointer -1 rather than stale but valid pointers."""
    junk = []
    for stream in streams:
        with torch.cuda.stream(stream):
            for numel in (8, 64, 128, 256, 1024, 4096):
                junk += [torch.full((numel,), -1, dtype=torch.int64, device="cuda")
                         for _ in range(64)]
    torch.cuda.synchronize()
    return junk


def test_captured_clip_replays_after_its_plan_fell_out_of_the_lru():
    """The captured plan is pinned: more than PLAN_CACHE_SIZE other plans later (their
    memory freed and scribbled over), replays still clip exactly like torch."""
    gradstats.worklist.clear_plan_cache()
    params = make_params([1000, 33, 70000], torch.float32, "cuda")
    static_grads = [p.grad for p in params]
    graph, total, side = _warm_up_and_capture(
        lambda: gradstats.fused_clip_grad_norm_(params, 1.0))
    for stream in (torch.cuda.current_stream(), side):
        with torch.cuda.stream(stream):
            for size in range(1, gradstats.worklist.PLAN_CACHE_SIZE + 6):
                gradstats.get_total_norm([torch.randn(size, device="cuda") for _ in range(3)])
    junk = _scribble_over_freed_memory([torch.cuda.current_stream(), side])
    _replays_clip_like_torch(graph, total, params, static_grads)
    del graph, junk
    torch.cuda.synchronize()
    assert gradstats.release_captured_plans() >= 1
    twins = clone_params(params)  # rebuilt eagerly after the release, as any miss
    torch.testing.assert_close(gradstats.fused_clip_grad_norm_(params, 1.0),
                               torch.nn.utils.clip_grad_norm_(twins, 1.0), rtol=1e-5, atol=0)


def test_capture_of_a_kernel_not_compiled_yet_is_a_clear_error():
    params = make_params([100], torch.float32, "cuda")
    gradstats.get_total_norm([p.grad for p in params])  # warm-up: the plan, no histogram
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="first launch of a Triton kernel specialization"):
        with torch.cuda.graph(graph):
            gradstats.grad_stats(params, num_bins=37, min_exp=-21)  # a histogram never built


def test_plan_built_on_a_busy_stream_is_safe_on_another():
    """The plan's metadata copy waits behind a long kernel on the stream that built it; a
    first use on another stream must wait for it rather than read unfilled memory."""
    grads = [torch.randn(n, device="cuda") for n in (1000, 33, 70000)]
    expected = torch.nn.utils.get_total_norm(grads)
    torch.cuda.synchronize()
    gradstats.worklist.clear_plan_cache()
    busy, other = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(busy):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time ahead of the copy
        gradstats.worklist.plan_for(grads, grads[0].device)
    with torch.cuda.stream(other):
        total = gradstats.get_total_norm(grads)
    torch.cuda.synchronize()
    torch.testing.assert_close(total, expected)


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
