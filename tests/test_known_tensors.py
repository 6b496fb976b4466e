"""known_tensors: a list of gradients seen before skips the plan key, and every change to
a gradient (a new tensor, new storage, another shape or dtype, None, another order) still
gets a plan of its own, with results equal to torch's.

known_tensors serves the Python host path; with the native one (csrc/host_path.cpp) every
call builds its key in C++ and nothing is remembered, so it is switched off here (the
native key's hits and misses: tests/test_host_path.py)."""
import gc

import pytest
import torch
from helpers import clone_params, count_plan_key_builds, make_params

import gradstats
from gradstats import dispatch, known_tensors, native


@pytest.fixture(autouse=True)
def python_host_path(monkeypatch):
    monkeypatch.setattr(native, "host_path_available", lambda: False)


@pytest.fixture
def key_builds(monkeypatch):
    return count_plan_key_builds(monkeypatch)


def clip_like_torch(params, max_norm=0.5):
    """Clip ``params`` with gradstats and clones of them with torch; assert equal."""
    twins = clone_params(params)
    total = gradstats.fused_clip_grad_norm_(params, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(twins, max_norm)
    torch.testing.assert_close(total, expected)
    for param, twin in zip(params, twins):
        if twin.grad is None:
            assert param.grad is None
        else:
            torch.testing.assert_close(param.grad, twin.grad)


def test_same_gradients_skip_the_plan_key(triton_device, key_builds):
    params = make_params([10, 300, 7], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1e9)
    assert key_builds == [3]
    clip_like_torch(params)
    gradstats.grad_stats(params)
    assert key_builds == [3]


def test_replaced_gradient_misses(triton_device, key_builds):
    params = make_params([10, 300, 7], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1e9)
    params[1].grad = torch.randn(300, device=triton_device)
    clip_like_torch(params)
    assert key_builds == [3, 3]


def test_gradient_set_to_none_is_skipped(triton_device):
    params = make_params([10, 300, 7], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1e9)
    params[0].grad = None
    clip_like_torch(params)


def test_new_storage_under_the_same_tensor_misses(triton_device, key_builds):
    """``.data =`` (as ``module.to()`` does) keeps the tensor object, not its memory."""
    params = make_params([10, 300], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1e9)
    grad = params[1].grad
    grad.data = torch.randn(300, device=triton_device)
    assert params[1].grad is grad
    clip_like_torch(params)
    assert key_builds == [2, 2]


def test_same_tensor_same_address_other_shape_misses(triton_device, key_builds):
    """A shrinking ``set_`` keeps object and address; only the size tells."""
    tensors = [torch.randn(64, device=triton_device), torch.randn(300, device=triton_device)]
    gradstats.get_total_norm(tensors)
    address = tensors[1].data_ptr()
    tensors[1].set_(tensors[1].untyped_storage(), 0, (5, 7))
    assert tensors[1].data_ptr() == address
    expected = torch.nn.utils.get_total_norm(tensors)
    torch.testing.assert_close(gradstats.get_total_norm(tensors), expected)
    assert key_builds == [2, 2]
    assert dispatch.route(tensors).plan.numel.tolist() == [64, 35]


def test_new_tensor_at_a_dead_tensors_address_misses(triton_device):
    """The old gradient dies first, so its list is forgotten: a new tensor object, maybe at
    the same id and address, with another shape and dtype, gets its own plan."""
    params = make_params([10, 256], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1e9)
    storage = params[1].grad.untyped_storage()
    params[1].grad = None
    gc.collect()
    params[1].data = torch.zeros(64, dtype=torch.float64, device=triton_device)
    params[1].grad = torch.empty(0, dtype=torch.float64, device=triton_device).set_(
        storage, 0, (64,))  # 512 bytes: the old gradient's memory, reinterpreted
    params[1].grad.normal_()
    clip_like_torch(params)


def test_dtype_change_misses(triton_device):
    params = make_params([10, 300], torch.float32, triton_device)
    gradstats.fused_clip_grad_norm_(params, 1e9)
    for param in params:
        param.data = param.data.double()
        param.grad.data = param.grad.data.double()
    clip_like_torch(params)
    assert gradstats.grad_stats(params).norms.dtype == torch.float64


def test_reordered_list_misses_and_keeps_its_order(triton_device, key_builds):
    params = make_params([10, 300, 7], torch.float32, triton_device)
    gradstats.grad_stats(params)
    reordered = params[::-1]
    stats = gradstats.grad_stats(reordered)
    assert key_builds == [3, 3]
    expected = torch.stack([torch.linalg.vector_norm(p.grad) for p in reordered])
    torch.testing.assert_close(stats.norms, expected)
    assert stats.numel.tolist() == [7, 300, 10]


def test_a_dying_gradient_forgets_its_list(triton_device):
    params = make_params([10, 300], torch.float32, triton_device)
    grads = [p.grad for p in params]
    gradstats.get_total_norm(grads)
    assert known_tensors.remembered_key(grads, triton_device) is not None
    ids = tuple(map(id, grads))
    params[0].grad = None
    del grads
    gc.collect()
    assert ids not in known_tensors._known._lists


def test_arming_backs_off_when_lists_never_live_on(triton_device, monkeypatch):
    """As with zero_grad(set_to_none=True): every step new gradients; after a few wasted
    armings, only every REARM_INTERVAL-th chance arms."""
    armed = []
    real = known_tensors._KnownList

    def counting(*args):
        armed.append(1)
        return real(*args)
    monkeypatch.setattr(known_tensors, "_KnownList", counting)
    params = make_params([10, 300], torch.float32, triton_device)
    steps = 2 * known_tensors.REARM_INTERVAL
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn_like(param)
        gradstats.get_total_norm([p.grad for p in params])
    limit = known_tensors.WASTED_ARMINGS_BEFORE_BACKOFF + 1 + steps // known_tensors.REARM_INTERVAL
    assert len(armed) <= limit
    for _ in range(3):  # gradients that live on are recognised again, and arming resumes
        gradstats.get_total_norm([p.grad for p in params])
    assert known_tensors._known._wasted == 0
