"""dispatch: one route per call (the plan key built once), the plan's facts, the checks
that must still see every call, and the device guard around every Triton launch.

No GPU here: the guard's CUDA branch is checked with ``torch.cuda.device`` replaced by a
recorder, and "every launch runs under the guard" with the launches and the guard replaced
by recorders on the interpreter path. Neither proves anything about a real second GPU.
"""
import contextlib

import pytest
import torch
from helpers import clone_params, count_plan_key_builds, make_params, with_grads

import gradstats
from gradstats import dispatch, worklist
from gradstats.kernels import apply, finalize, stats

KERNELS = [(stats, "_stats_kernel"), (stats, "_reduce_chunks_kernel"),
           (finalize, "_finalize_kernel"), (apply, "_update_kernel")]


@pytest.fixture
def key_builds(monkeypatch):
    """Plan keys built, with lists seen before not recognised (that path builds none:
    test_known_tensors.py), so every call takes the full key path."""
    monkeypatch.setattr(dispatch.known_tensors, "remembered_key", lambda tensors, device: None)
    return count_plan_key_builds(monkeypatch)


@pytest.mark.parametrize("call", [
    lambda ps: gradstats.fused_clip_grad_norm_(ps, 1e-3),
    lambda ps: gradstats.grad_stats(ps, max_norm=1e-3),
    lambda ps: gradstats.clip_grads_with_norm_(ps, 1e-3, torch.tensor(5.0)),
    lambda ps: gradstats.get_total_norm([p.grad for p in ps]),
], ids=["clip", "grad_stats", "clip_grads_with_norm_", "get_total_norm"])
def test_plan_key_is_built_once_per_call(triton_device, key_builds, call):
    params = make_params([10, 300, 7], torch.float32, triton_device)
    call(params)  # builds the plan
    key_builds.clear()
    call(params)
    assert key_builds == [3]


def test_monitor_step_builds_the_plan_key_once(triton_device, key_builds):
    params = make_params([10, 300], torch.float32, triton_device)
    monitor = gradstats.GradMonitor(params, sinks=None)
    monitor.step(max_norm=1e-3)
    key_builds.clear()
    monitor.step(max_norm=1e-3)
    assert key_builds == [2]
    monitor.close()


def test_plan_keeps_the_facts_of_its_list(triton_device):
    grads = [torch.randn(5, device=triton_device),
             torch.randn(4, 3, device=triton_device, dtype=torch.float64)]
    route = dispatch.route(grads)
    assert route.plan is not None and route.dtypes == {torch.float32, torch.float64}
    assert route.all_contiguous is True
    assert route.plan.numel.tolist() == [5, 12]


def test_checks_see_a_list_whose_tensors_changed_after_a_cached_plan(triton_device):
    params = make_params([6, 6], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1.0)  # a plan for two dense gradients
    params[1].grad = torch.randn(1, device=triton_device).expand(6)
    with pytest.raises(RuntimeError, match="expanded"):
        gradstats.fused_clip_grad_norm_(params, 1e-3)
    tensors = [p.grad for p in params[:1]] + [torch.randn(6, device=triton_device)]
    gradstats.get_total_norm(tensors)
    tensors[1] = torch.ones(6, dtype=torch.int32, device=triton_device)
    with pytest.raises(TypeError, match="dtype torch.int32"):
        gradstats.get_total_norm(tensors)


def test_same_address_and_numel_with_a_gap_gets_its_own_plan(triton_device):
    """A transposed view shares address and element count with the dense tensor, and a
    strided slice shares address with it: neither may reuse the dense tensor's plan."""
    base = torch.randn(4, 6, device=triton_device)
    gradstats.get_total_norm([base])
    for view in (base.t(), base[:, ::2]):
        expected = torch.nn.utils.get_total_norm([view])
        torch.testing.assert_close(gradstats.get_total_norm([view]), expected)


def test_reshaped_gradient_reuses_the_plan_and_clips_like_torch(triton_device):
    grads = [torch.randn(24, device=triton_device) * 3, torch.randn(5, device=triton_device)]
    gradstats.fused_clip_grad_norm_(with_grads(grads), 1e9)
    plans = len(worklist._plans)
    params = with_grads([grads[0].view(4, 6), grads[1]])  # same memory, new shape
    twins = clone_params(params)
    total = gradstats.fused_clip_grad_norm_(params, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(twins, 0.5)
    assert len(worklist._plans) == plans
    torch.testing.assert_close(total, expected)
    for param, twin in zip(params, twins):
        torch.testing.assert_close(param.grad, twin.grad)


def test_gradients_without_grad_are_skipped_with_their_names():
    params = make_params([3, 4, 5], torch.float32, torch.device("cpu"))
    params[1].grad = None
    grads, names = gradstats.params.gradients(params, ["a", "b", "c"])
    assert [g.numel() for g in grads] == [3, 5] and names == ["a", "c"]
    grads, names = gradstats.params.gradients(params, None)
    assert [g.numel() for g in grads] == [3, 5] and names is None


# -- the device guard ---------------------------------------------------------------------
class _RecordingDevice:
    """Stands in for ``torch.cuda.device``: records the devices entered."""

    entered: list = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _RecordingDevice.entered.append(self.device)

    def __exit__(self, *exc_info):
        return False


def test_guard_makes_the_tensors_cuda_device_current(monkeypatch):
    _RecordingDevice.entered = []
    monkeypatch.setattr(torch.cuda, "device", _RecordingDevice)
    with dispatch.on_device(torch.device("cuda", 1)):
        pass
    with dispatch.on_device(torch.device("cpu")):
        pass
    assert _RecordingDevice.entered == [torch.device("cuda", 1)]


@pytest.fixture
def guarded_launches(monkeypatch):
    """Every kernel launch replaced by a recorder of the device guard it ran under."""
    guard = []  # the devices of the guards entered and not yet left
    launches = []  # (kernel, device guarded, or None)

    @contextlib.contextmanager
    def recording_guard(device):
        guard.append(device)
        try:
            yield
        finally:
            guard.pop()

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(
                (self.name, guard[-1] if guard else None))

    monkeypatch.setattr(dispatch, "on_device", recording_guard)
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(name))
    return launches


@pytest.mark.parametrize("call", [
    lambda ps: gradstats.fused_clip_grad_norm_(ps, 1e-3),
    lambda ps: gradstats.grad_stats(ps, max_norm=1e-3),
    lambda ps: gradstats.clip_grad_value_(ps, 0.1),
    lambda ps: gradstats.clip_grads_with_norm_(ps, 1e-3, torch.tensor(5.0)),
], ids=["clip", "grad_stats", "clip_grad_value_", "clip_grads_with_norm_"])
def test_every_triton_launch_runs_under_the_gradients_device(triton_device, guarded_launches,
                                                             call):
    params = make_params([10, 300], torch.float32, triton_device)
    params.append(with_grads([torch.randn(7, dtype=torch.float16, device=triton_device)])[0])
    call(params)
    assert guarded_launches, "no launch was made"
    assert all(device == triton_device for _, device in guarded_launches), guarded_launches
