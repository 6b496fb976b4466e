"""Work gradstats refuses to start inside CUDA-graph capture, each with an error naming the
cause and the remedy. Capture is a flag here (``capture.capturing`` patched); the real
refusals on a GPU are in test_cuda.py."""
import contextlib

import pytest
import torch
from helpers import make_params, with_grads

import gradstats
from gradstats import capture, dispatch, stats, worklist

RUN_ONCE = "Run the same call once before capturing, with the same gradients"


class _Capture:
    def __init__(self):
        self.on = False

    def __call__(self, device):
        return self.on


@pytest.fixture
def fake_capture(monkeypatch):
    """``capture.capturing`` answers ``.on``; no kernel specialization counts as launched."""
    switch = _Capture()
    monkeypatch.setattr(capture, "capturing", switch)
    monkeypatch.setattr(capture, "_launched", set())
    worklist.clear_plan_cache()
    stats._numel_tensors.clear()
    yield switch
    worklist.clear_plan_cache()
    stats._numel_tensors.clear()


def test_plan_miss_in_capture_is_refused(triton_device, fake_capture):
    params = make_params([300], torch.float32, triton_device)
    fake_capture.on = True
    with pytest.raises(RuntimeError, match=f"no cached work list.*capture. {RUN_ONCE}"):
        gradstats.fused_clip_grad_norm_(params, 1.0)
    assert len(worklist._plans) == 0


def test_warmed_up_call_is_not_refused_in_capture(triton_device, fake_capture):
    params = make_params([300, 20000], torch.bfloat16, triton_device)
    for call in (lambda: gradstats.fused_clip_grad_norm_(params, 1.0),
                 lambda: gradstats.grad_stats(params, max_norm=1.0),
                 lambda: gradstats.clip_grad_value_(params, 0.5)):
        fake_capture.on = False
        call()
        fake_capture.on = True
        call()


def test_new_kernel_specialization_in_capture_is_refused(triton_device, fake_capture):
    params = make_params([300], torch.float32, triton_device)
    gradstats.grad_stats(params, histogram=False)  # warm-up: plan built, no histogram
    fake_capture.on = True
    with pytest.raises(RuntimeError, match=f"first launch of a Triton kernel specialization "
                                           rf"\('stats'.*capture. {RUN_ONCE}"):
        gradstats.grad_stats(params, histogram=True)



def test_new_finalize_specialization_in_capture_is_refused(triton_device, fake_capture):
    params = make_params([300], torch.float32, triton_device)
    # A finite max_norm beyond fp32's range is finalized by torch: only the stats launched.
    gradstats.grad_stats(params, histogram=False, max_norm=1e39)
    fake_capture.on = True
    with pytest.raises(RuntimeError, match=r"specialization \('finalize'"):
        gradstats.get_total_norm([p.grad for p in params])


def test_new_scale_specialization_in_capture_is_refused(triton_device, fake_capture):
    params = make_params([300], torch.float32, triton_device, scale=10.0)
    gradstats.fused_clip_grad_norm_(params, 1.0)
    fake_capture.on = True
    total_norm = torch.tensor(5.0, dtype=torch.float64, device=triton_device)  # new coef dtype
    with pytest.raises(RuntimeError, match=r"specialization \('scale'"):
        gradstats.clip_grads_with_norm_(params, 1.0, total_norm)


def test_histogram_options_do_not_split_calls_without_a_histogram(triton_device, fake_capture):
    """Without a histogram, min_exp selects nothing in the kernels: clip_grad_norm_'s pass
    (min_exp 0) and grad_stats(histogram=False, min_exp=-40) share one specialization."""
    params = make_params([300], torch.float32, triton_device)
    gradstats.get_total_norm([p.grad for p in params])
    fake_capture.on = True
    gradstats.grad_stats(params, histogram=False, min_exp=-40)


def test_numel_tensor_miss_in_capture_is_refused(monkeypatch, fake_capture):
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    fake_capture.on = True
    with pytest.raises(RuntimeError, match=f"element-count tensor.*{RUN_ONCE}"):
        gradstats.grad_stats(with_grads([torch.randn(5)]))


def test_several_devices_in_capture_are_refused(fake_capture):
    grads = [torch.randn(5), torch.empty(3, device="meta")]  # two devices without a GPU
    fake_capture.on = True
    with pytest.raises(RuntimeError, match="several devices.*Capture one call per device"):
        stats._accumulate_on_each_device(grads, 2.0, 0, 0)
    with pytest.raises(RuntimeError, match="several devices.*Capture one call per device"):
        dispatch.scale_(grads, torch.tensor(0.5))


def test_capturing_asks_the_gradients_device(monkeypatch):
    """``cuda:1`` while ``cuda:0`` is current: the answer is cuda:1's, under its guard."""
    current = {"device": 0}
    capturing_devices = {1}

    @contextlib.contextmanager
    def device_guard(device):
        before, current["device"] = current["device"], device.index
        try:
            yield
        finally:
            current["device"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing",
                        lambda: current["device"] in capturing_devices)
    assert capture.capturing(torch.device("cuda", 1))
    assert not capture.capturing(torch.device("cuda", 0))
    assert current["device"] == 0
    capturing_devices.add(0)
    assert capture.capturing(torch.device("cuda", 0))
    assert not capture.capturing(torch.device("cpu"))


def test_note_launch_refuses_only_new_signatures_in_capture(fake_capture):
    cpu = torch.device("cpu")
    capture.note_launch(("kernel", 1), cpu)
    fake_capture.on = True
    capture.note_launch(("kernel", 1), cpu)
    with pytest.raises(RuntimeError, match=r"\('kernel', 2\)"):
        capture.note_launch(("kernel", 2), cpu)
    fake_capture.on = False
    capture.note_launch(("kernel", 2), cpu)
    fake_capture.on = True
    capture.note_launch(("kernel", 2), cpu)
