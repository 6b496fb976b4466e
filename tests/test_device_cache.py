"""Cached plans and element-count tensors under CUDA-graph capture and on several streams.

Without a GPU, capture is a flag (``capture.capturing`` patched) and streams are a fake
(``device_cache.streams_of`` patched); the kernels still run, in the interpreter. The real
capture and replay are in test_cuda.py.
"""
import gc
import weakref

import pytest
import torch
from helpers import make_params, with_grads

import gradstats
from gradstats import capture, device_cache, host_path, native, stats, worklist
from gradstats.device_cache import DeviceCache

OTHER_PLANS = worklist.PLAN_CACHE_SIZE + 5


class _FakeStream:
    def __init__(self, stream_id, log):
        self.stream_id = stream_id
        self.log = log

    def wait_event(self, event):
        self.log.append(("wait", self.stream_id, event))


class _FakeCuda:
    """CPU tensors treated as CUDA ones: ``capture.capturing`` answers ``capturing`` (and
    counts the questions), and the stream calls of ``device_cache`` log what they do.
    ``current_stream`` is the current stream's id."""

    def __init__(self):
        self.capturing = False
        self.asked = 0
        self.current_stream = 1
        self.log = []  # ("event", stream) | ("wait", stream, event) | ("record", stream, ptr)

    def is_capturing(self, device):
        self.asked += 1
        return self.capturing

    def current_id(self, device):
        return self.current_stream

    def current(self, device):
        return _FakeStream(self.current_stream, self.log)

    def event_after_copies(self, device):
        self.log.append(("event", self.current_stream))
        return f"copied-on-{self.current_stream}"

    def record_stream(self, tensor, stream):
        self.log.append(("record", stream.stream_id, tensor.data_ptr()))

    def take(self, kind):
        found = [entry for entry in self.log if entry[0] == kind]
        self.log = [entry for entry in self.log if entry[0] != kind]
        return found


@pytest.fixture
def fake_cuda(monkeypatch):
    cuda = _FakeCuda()
    monkeypatch.setattr(capture, "capturing", cuda.is_capturing)
    monkeypatch.setattr(device_cache, "streams_of", lambda device: cuda)
    # CPU tensors stand in for a CUDA device here: the element counts go through the
    # device cache as CUDA ones do, not through the native layer's count for CPU lists.
    monkeypatch.setattr(native, "numel_tensor", lambda tensors, listing=None: None)
    worklist.clear_plan_cache()
    stats._numel_tensors.clear()
    yield cuda
    worklist.clear_plan_cache()
    stats._numel_tensors.clear()


def _plan_of(grads):
    return worklist.cached_plan(host_path.plan_key(grads))  # the key of the path in force


def _build_other_plans(device, count=OTHER_PLANS):
    for size in range(1, count + 1):
        gradstats.get_total_norm([torch.randn(size, device=device)])


# --- pinning -------------------------------------------------------------------------------


def test_plan_used_in_capture_survives_many_other_plans(triton_device, fake_cuda):
    params = make_params([300, 7], torch.float32, triton_device)
    grads = [p.grad for p in params]
    gradstats.fused_clip_grad_norm_(params, 1.0)  # warm-up: builds the plan, launches
    plan = _plan_of(grads)
    meta = plan.groups[0].meta
    meta_before = meta.clone()
    fake_cuda.capturing = True
    gradstats.fused_clip_grad_norm_(params, 1.0)  # "captured": pins the plan
    fake_cuda.capturing = False
    _build_other_plans(triton_device)
    assert _plan_of(grads) is plan  # still cached, though 21 plans came after it
    assert plan.groups[0].meta is meta
    torch.testing.assert_close(meta, meta_before, rtol=0, atol=0)
    assert len(worklist._plans._recent) == worklist.PLAN_CACHE_SIZE  # the LRU stays bounded
    assert len(worklist._plans) == worklist.PLAN_CACHE_SIZE + 1


def test_plan_not_used_in_capture_is_freed_by_eviction(triton_device, fake_cuda):
    grads = [torch.randn(300, device=triton_device)]
    gradstats.get_total_norm(grads)
    meta = weakref.ref(_plan_of(grads).groups[0].meta)
    _build_other_plans(triton_device)
    gc.collect()
    assert _plan_of(grads) is None and meta() is None


def test_release_captured_plans_frees_pinned_plans(triton_device, fake_cuda):
    grads = [torch.randn(300, device=triton_device)]
    gradstats.get_total_norm(grads)
    fake_cuda.capturing = True
    gradstats.get_total_norm(grads)
    fake_cuda.capturing = False
    meta = weakref.ref(_plan_of(grads).groups[0].meta)
    _build_other_plans(triton_device)
    assert gradstats.release_captured_plans() == 1
    gc.collect()
    assert meta() is None
    assert _plan_of(grads) is None
    assert len(worklist._plans) == worklist.PLAN_CACHE_SIZE
    torch.testing.assert_close(gradstats.get_total_norm(grads),  # rebuilt, as any miss
                               torch.nn.utils.get_total_norm(grads))


def test_release_unpins_a_captured_plan_still_in_the_lru(triton_device, fake_cuda):
    grads = [torch.randn(300, device=triton_device)]
    gradstats.get_total_norm(grads)
    fake_cuda.capturing = True
    gradstats.get_total_norm(grads)
    fake_cuda.capturing = False
    assert gradstats.release_captured_plans() == 1
    assert gradstats.release_captured_plans() == 0
    _build_other_plans(triton_device)  # now an ordinary entry: evicted like any other
    assert _plan_of(grads) is None and len(worklist._plans) == worklist.PLAN_CACHE_SIZE


def test_numel_tensor_used_in_capture_survives_and_is_released(monkeypatch, fake_cuda):
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")  # no plan: the element-count cache
    grads = [torch.randn(5), torch.randn(2, 3)]
    params = with_grads(grads)
    gradstats.grad_stats(params)
    fake_cuda.capturing = True
    captured = gradstats.grad_stats(params)
    fake_cuda.capturing = False
    numel = weakref.ref(stats._numel_tensor((5, 6), torch.device("cpu")))
    for size in range(1, OTHER_PLANS + 1):
        gradstats.grad_stats(with_grads([torch.randn(size)]))
    assert stats._numel_tensor((5, 6), torch.device("cpu")) is numel()
    assert captured.numel.tolist() == [5, 6]
    assert gradstats.release_captured_plans() == 1
    gc.collect()
    assert numel() is None


def test_numel_tensor_not_used_in_capture_is_evicted(monkeypatch, fake_cuda):
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    gradstats.grad_stats(with_grads([torch.randn(5)]))
    numel = weakref.ref(stats._numel_tensor((5,), torch.device("cpu")))
    for size in range(6, OTHER_PLANS + 6):
        gradstats.grad_stats(with_grads([torch.randn(size)]))
    gc.collect()
    assert numel() is None


def test_cache_pins_only_entries_used_during_capture(fake_cuda):
    cache = DeviceCache(2)
    cpu = torch.device("cpu")
    tensors = {name: torch.zeros(2) for name in "abcd"}
    for name in "ab":
        cache.add(name, name.upper(), cpu, [tensors[name]])
    fake_cuda.capturing = True
    assert cache.get("a") == "A"
    fake_cuda.capturing = False
    cache.add("c", "C", cpu, [tensors["c"]])  # evicts "b" ("a" was used last)
    cache.add("d", "D", cpu, [tensors["d"]])  # evicts "a" into the pinned store
    assert sorted(cache) == ["a", "c", "d"]
    assert cache.get("a") == "A" and cache.get("b") is None
    assert cache.release_pinned() == 1 and sorted(cache) == ["c", "d"]


# --- streams -------------------------------------------------------------------------------


def test_first_use_on_each_new_stream_waits_for_the_copy_and_records_the_stream(
        triton_device, fake_cuda):
    params = make_params([300, 70000], torch.float32, triton_device)
    grads = [p.grad for p in params]
    gradstats.fused_clip_grad_norm_(params, 1.0)  # built on stream 1
    assert fake_cuda.take("event") == [("event", 1)]
    tensors = {t.data_ptr() for t in worklist._device_tensors(_plan_of(grads))}
    assert len(tensors) == 2  # one dtype group's meta and the element counts
    gradstats.fused_clip_grad_norm_(params, 1.0)
    assert fake_cuda.log == []  # the build stream: nothing to do
    for stream in (2, 3):
        fake_cuda.current_stream = stream
        for _ in range(3):
            gradstats.fused_clip_grad_norm_(params, 1.0)
        assert fake_cuda.take("wait") == [("wait", stream, "copied-on-1")]
        records = fake_cuda.take("record")
        assert sorted(records) == sorted(("record", stream, ptr) for ptr in tensors)
        assert fake_cuda.log == []


def test_first_use_on_a_new_stream_during_capture_records_without_waiting(
        triton_device, fake_cuda):
    grads = [torch.randn(300, device=triton_device)]
    gradstats.get_total_norm(grads)
    fake_cuda.take("event")
    fake_cuda.current_stream = 7  # the capture stream
    fake_cuda.capturing = True
    gradstats.get_total_norm(grads)
    fake_cuda.capturing = False
    assert fake_cuda.take("wait") == []  # CUDA forbids waiting on an outside event
    assert {entry[1] for entry in fake_cuda.take("record")} == {7}
    assert worklist._plans._recent[next(iter(worklist._plans))].lifetime.pinned


def test_numel_tensor_on_a_new_stream_is_recorded_once(monkeypatch, fake_cuda):
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    params = with_grads([torch.randn(5)])
    gradstats.grad_stats(params)
    fake_cuda.take("event")
    fake_cuda.current_stream = 2
    gradstats.grad_stats(params)
    gradstats.grad_stats(params)
    numel = stats._numel_tensor((5,), torch.device("cpu"))
    assert fake_cuda.take("record") == [("record", 2, numel.data_ptr())]
    assert len(fake_cuda.take("wait")) == 1


def test_warm_calls_ask_about_capture_once_each(triton_device, fake_cuda):
    """The ordinary path's whole cost of capture safety: one capture check (and one
    stream-id read) per call, whatever the tensor count; none on real CPU tensors."""
    params = make_params([300], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1.0)
    gradstats.grad_stats(params, max_norm=1.0)
    fake_cuda.asked = 0
    for _ in range(3):
        gradstats.fused_clip_grad_norm_(params, 1.0)
        gradstats.grad_stats(params, max_norm=1.0)
    assert fake_cuda.asked == 6


def test_warm_calls_on_real_cpu_tensors_never_ask_about_capture(triton_device, monkeypatch):
    asked = []
    monkeypatch.setattr(capture, "capturing", lambda device: asked.append(device) or False)
    params = make_params([300], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1.0)
    asked.clear()
    gradstats.fused_clip_grad_norm_(params, 1.0)
    assert asked == []
