"""The drop-ins against torch.nn.utils itself (and a float64 reference where torch rounds)."""
import math
import warnings

import pytest
import torch
from helpers import (
    COMPOSED_NORM_TYPES,
    FLOAT_DTYPES,
    FUSED_NORM_TYPES,
    clone_params,
    make_params,
    torch_rtol,
    with_grads,
)

import gradstats

SIZES = [0, 1, 5, 131, 2053]
ALL_NORM_TYPES = FUSED_NORM_TYPES + COMPOSED_NORM_TYPES


def assert_grads_close(ours, theirs, dtype):
    for a, b in zip(ours, theirs):
        if a.grad is None:
            assert b.grad is None
            continue
        rtol = torch_rtol(dtype)
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=rtol * 1e-3, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", ALL_NORM_TYPES)
def test_get_total_norm_matches_torch(backend_device, dtype, p):
    params = make_params([1, 5, 131, 2053], dtype, backend_device)
    grads = [q.grad for q in params]
    ours = gradstats.get_total_norm(grads, p)
    theirs = torch.nn.utils.get_total_norm(grads, p)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == ()
    assert ours.device == theirs.device
    torch.testing.assert_close(ours, theirs, rtol=torch_rtol(dtype), atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, math.inf, -math.inf])
@pytest.mark.parametrize("max_norm", [1e-2, 1e6])
def test_clip_grad_norm_matches_torch(backend_device, dtype, p, max_norm):
    ours = make_params(SIZES, dtype, backend_device, scale=2.0)
    ours[2].grad = None
    theirs = clone_params(ours)
    total = gradstats.fused_clip_grad_norm_(ours, max_norm, p)
    # torch raises on empty tensors under +-inf; they contribute nothing to ours.
    non_empty = [q for q in theirs if q.numel()] if math.isinf(p) else theirs
    expected = torch.nn.utils.clip_grad_norm_(non_empty, max_norm, p)
    torch.testing.assert_close(total, expected, rtol=torch_rtol(dtype), atol=0)
    assert_grads_close(ours, theirs, dtype)


def test_mixed_dtypes_match_torch(backend_device):
    ours = (make_params([33, 7], torch.float32, backend_device)
            + make_params([90], torch.bfloat16, backend_device)
            + make_params([12], torch.float16, backend_device))
    theirs = clone_params(ours)
    total = gradstats.fused_clip_grad_norm_(ours, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert total.dtype == expected.dtype == torch.float32
    # torch rounds the bf16 tensor's norm to bf16 before combining: bf16 tolerance.
    torch.testing.assert_close(total, expected, rtol=torch_rtol(torch.bfloat16), atol=0)
    assert_grads_close(ours, theirs, torch.bfloat16)


def test_many_tensors_match_torch(backend_device, small_chunks):
    ours = make_params([(i * 53) % 600 + 1 for i in range(310)], torch.float32, backend_device)
    theirs = clone_params(ours)
    torch.testing.assert_close(gradstats.fused_clip_grad_norm_(ours, 1.0),
                               torch.nn.utils.clip_grad_norm_(theirs, 1.0), rtol=1e-5, atol=0)
    assert_grads_close(ours, theirs, torch.float32)


def test_non_contiguous_grads_clipped_in_place(backend_device):
    base = torch.randn(30, 40, device=backend_device)
    grads = [base.clone().t(), base.clone()[:, ::3], torch.randn(3, 4, 5, 6,
             device=backend_device).to(memory_format=torch.channels_last)]
    ours = with_grads(grads)
    theirs = clone_params(ours)
    torch.testing.assert_close(gradstats.fused_clip_grad_norm_(ours, 0.1),
                               torch.nn.utils.clip_grad_norm_(theirs, 0.1))
    assert_grads_close(ours, theirs, torch.float32)
    assert all(q.grad is g for q, g in zip(ours, grads))  # updated in place, same strides


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_no_clipping_needed_leaves_grads_bit_identical(backend_device, dtype):
    params = make_params([1, 300, 4097], dtype, backend_device)
    params[1].grad[5] = -0.0
    before = [q.grad.clone() for q in params]
    pointers = [q.grad.data_ptr() for q in params]
    total = gradstats.fused_clip_grad_norm_(params, 1e9)
    assert total.item() > 0
    for q, old, ptr in zip(params, before, pointers):
        assert q.grad.data_ptr() == ptr
        assert torch.equal(q.grad, old)
        assert torch.equal(q.grad.signbit(), old.signbit())


def test_inf_norm_with_empty_tensor_does_better_than_torch(backend_device):
    params = make_params([0, 6], torch.float32, backend_device)
    expected = params[1].grad.abs().max().item()
    assert gradstats.fused_clip_grad_norm_(params, 1.0, math.inf).item() == expected
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, math.inf)


@pytest.mark.parametrize("p", [0.5, 2.0, math.inf])
def test_nan_and_inf_propagate_like_torch(backend_device, p):
    for bad in (float("nan"), float("inf")):
        ours = make_params([10, 20], torch.float32, backend_device)
        ours[1].grad[3] = bad
        theirs = clone_params(ours)
        total = gradstats.fused_clip_grad_norm_(ours, 1.0, p)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, p)
        torch.testing.assert_close(total, expected, equal_nan=True)
        assert_grads_close(ours, theirs, torch.float32)


def test_empty_inputs_like_torch():
    assert gradstats.get_total_norm([]).item() == 0.0
    no_grad = torch.nn.Parameter(torch.ones(2))
    assert torch.equal(gradstats.fused_clip_grad_norm_([no_grad], 1.0), torch.tensor(0.0))
    with pytest.warns(UserWarning, match="empty generator, no gradient clipping will occur"):
        gradstats.fused_clip_grad_norm_((q for q in []), 1.0)


def test_empty_generator_warning_points_at_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradstats.fused_clip_grad_norm_((q for q in []), 1.0)
    assert caught[0].filename == __file__


def test_single_tensor_and_generator_inputs(backend_device):
    param = make_params([17], torch.float32, backend_device)[0]
    twin = clone_params([param])[0]
    torch.testing.assert_close(gradstats.fused_clip_grad_norm_(param, 0.1),
                               torch.nn.utils.clip_grad_norm_(twin, 0.1))
    params = make_params([3, 4], torch.float32, backend_device)
    twins = clone_params(params)
    torch.testing.assert_close(gradstats.fused_clip_grad_norm_((q for q in params), 0.1),
                               torch.nn.utils.clip_grad_norm_((q for q in twins), 0.1))
    assert_grads_close(params, twins, torch.float32)


@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
def test_error_if_nonfinite_names_parameters_and_modifies_nothing(backend_device, norm_type):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(backend_device)
    model(torch.randn(2, 4, device=backend_device)).sum().backward()
    model[1].weight.grad[0, 1] = float("nan")
    model[0].bias.grad[2] = float("inf")
    before = [q.grad.clone() for q in model.parameters()]
    with pytest.raises(RuntimeError, match=r"is non-finite.*'0\.bias' \(1 NaN/Inf\), "
                                           r"'1\.weight' \(1 NaN/Inf\)"):
        gradstats.fused_clip_grad_norm_(model, 1.0, norm_type, error_if_nonfinite=True)
    for q, old in zip(model.parameters(), before):
        torch.testing.assert_close(q.grad, old, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"parameter 2 \(1 NaN/Inf\)"):
        gradstats.fused_clip_grad_norm_(list(model.parameters()), 1.0, norm_type,
                                        error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=r"tensor 1 \(1 NaN/Inf\)"):
        gradstats.get_total_norm([q.grad for q in model.parameters()], norm_type,
                                 error_if_nonfinite=True)


def test_error_if_nonfinite_overflow_is_explained(backend_device):
    params = make_params([4], torch.float32, backend_device)
    params[0].grad.fill_(1e30)
    with pytest.raises(RuntimeError, match="overflowed"):
        gradstats.fused_clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_clip_grads_with_norm_matches_torch(backend_device):
    for dtype in FLOAT_DTYPES:
        ours = make_params(SIZES, dtype, backend_device)
        theirs = clone_params(ours)
        total = torch.nn.utils.get_total_norm([q.grad for q in theirs if q.grad is not None])
        gradstats.clip_grads_with_norm_(ours, 0.3, total)
        torch.nn.utils.clip_grads_with_norm_(theirs, 0.3, total)
        # Same coefficient as torch: equal up to the final rounding to the gradient dtype.
        ulp = torch.finfo(dtype).eps
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=ulp, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_grad_value_matches_torch(backend_device, dtype):
    ours = make_params(SIZES, dtype, backend_device, scale=3.0)
    ours[3].grad[[0, 1]] = torch.tensor([float("nan"), -float("inf")], dtype=dtype)
    ours[1].grad = None
    theirs = clone_params(ours)
    gradstats.clip_grad_value_(ours, 2.5)
    torch.nn.utils.clip_grad_value_(theirs, 2.5)
    for a, b in zip(ours, theirs):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


# What torch's own test_nn.py checks for these functions, written again here.

def test_torch_nn_clip_grad_norm_battery(backend_device):
    layer = torch.nn.Linear(10, 10).to(backend_device)
    max_norm = 2.0

    def fill_grads():
        for q in layer.parameters():
            q.grad = torch.arange(1.0, q.numel() + 1, device=backend_device).view_as(q)

    def norm_of(p):
        grads = torch.cat([q.grad.view(-1) for q in layer.parameters()])
        return grads.abs().max() if p == math.inf else grads.abs().pow(p).sum().pow(1 / p)

    for norm_type in [0.5, 1.5, 2, 4, "inf"]:
        p = float(norm_type)
        fill_grads()
        old_grads = [q.grad.clone() for q in layer.parameters()]
        old_norm = norm_of(p)
        total = gradstats.fused_clip_grad_norm_(layer.parameters(), max_norm, norm_type)
        torch.testing.assert_close(total, old_norm)
        scales = [q.grad / old for q, old in zip(layer.parameters(), old_grads)]
        expected_scale = max_norm / old_norm
        for scale in scales:
            torch.testing.assert_close(scale, torch.full_like(scale, expected_scale.item()))
        torch.testing.assert_close(norm_of(p), torch.tensor(max_norm, device=backend_device),
                                   rtol=1e-5, atol=1e-5)

    # Small gradients: no change.
    for q in layer.parameters():
        q.grad = torch.rand_like(q) * 1e-3
    before = [q.grad.clone() for q in layer.parameters()]
    gradstats.fused_clip_grad_norm_(layer.parameters(), max_norm)
    for q, old in zip(layer.parameters(), before):
        assert torch.equal(q.grad, old)

    # A single tensor is accepted and gives the same result as a list of one.
    fill_grads()
    weight = layer.weight
    twin = torch.nn.Parameter(weight.detach().clone())
    twin.grad = weight.grad.clone()
    gradstats.fused_clip_grad_norm_(weight, max_norm)
    gradstats.fused_clip_grad_norm_([twin], max_norm)
    assert torch.equal(weight.grad, twin.grad)


@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
@pytest.mark.parametrize("grad_only_one_elem", [True, False])
@pytest.mark.parametrize("prefix_finite", [True, False])
@pytest.mark.parametrize("scalar_value", [float("inf"), float("nan"), 1e20])  # 1e20: x*x overflows
def test_torch_nn_error_if_nonfinite_battery(backend_device, norm_type, grad_only_one_elem,
                                             prefix_finite, scalar_value):
    def make_param():
        param = torch.nn.Parameter(torch.zeros(10, device=backend_device))
        param.grad = torch.ones(10, device=backend_device)
        if grad_only_one_elem:
            param.grad[3] = scalar_value
        else:
            param.grad.fill_(scalar_value)
        return param

    finite = torch.nn.Parameter(torch.zeros(10, device=backend_device))
    finite.grad = torch.ones(10, device=backend_device)
    params = ([finite] if prefix_finite else []) + [make_param()]
    twins = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(twins, 1.0, norm_type)
    if math.isfinite(expected.item()):
        checked = clone_params(params)
        total = gradstats.fused_clip_grad_norm_(checked, 1.0, norm_type, error_if_nonfinite=True)
        torch.testing.assert_close(total, expected, rtol=torch_rtol(torch.float32), atol=0)
    else:
        before = [q.grad.clone() for q in params]
        with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
            gradstats.fused_clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
        for q, old in zip(params, before):
            torch.testing.assert_close(q.grad, old, equal_nan=True, rtol=0, atol=0)
    total = gradstats.fused_clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=False)
    torch.testing.assert_close(total, expected, rtol=torch_rtol(torch.float32), atol=0,
                               equal_nan=True)
    assert_grads_close(params, twins, torch.float32)


def test_torch_nn_clip_grad_value_battery(backend_device):
    layer = torch.nn.Linear(10, 10).to(backend_device)
    clip_value = 2.5
    grad_w = torch.arange(-50.0, 50, device=backend_device).view(10, 10).div_(5)
    grad_b = torch.ones(10, device=backend_device).mul_(2)
    for grad_list in [[grad_w, grad_b], [grad_w, None]]:
        for q, g in zip(layer.parameters(), grad_list):
            q.grad = g.clone() if g is not None else None
        gradstats.clip_grad_value_(layer.parameters(), clip_value)
        for q in filter(lambda q: q.grad is not None, layer.parameters()):
            assert q.grad.max() <= clip_value and q.grad.min() >= -clip_value
    # A single tensor is accepted.
    weight = torch.nn.Parameter(torch.zeros(3, device=backend_device))
    weight.grad = torch.tensor([-5.0, 0.5, 9.0], device=backend_device)
    gradstats.clip_grad_value_(weight, clip_value)
    assert weight.grad.tolist() == [-2.5, 0.5, 2.5]


@pytest.mark.parametrize("call", [
    lambda ps: gradstats.fused_clip_grad_norm_(ps, -1.0),
    lambda ps: gradstats.fused_clip_grad_norm_(ps, float("nan")),
    lambda ps: gradstats.fused_clip_grad_norm_(ps, 1.0, "fro"),
    lambda ps: gradstats.fused_clip_grad_norm_(ps, 1.0, float("nan")),
    lambda ps: gradstats.fused_clip_grad_norm_(ps, "big"),
    lambda ps: gradstats.fused_clip_grad_norm_(ps, 1.0, foreach="yes"),
    lambda ps: gradstats.fused_clip_grad_norm_([ps[0], 3], 1.0),
    lambda ps: gradstats.clip_grads_with_norm_(ps, -2.0, torch.tensor(5.0)),
    lambda ps: gradstats.clip_grad_value_(ps, -1.0),
    lambda ps: gradstats.clip_grad_value_(ps, float("nan")),
])
def test_bad_arguments_raise_before_modifying(call):
    params = make_params([4, 5], torch.float32, "cpu", scale=100.0)
    before = [q.grad.clone() for q in params]
    with pytest.raises((ValueError, TypeError)):
        call(params)
    for q, old in zip(params, before):
        assert torch.equal(q.grad, old)


def test_integer_tensors_are_rejected_by_name():
    with pytest.raises(TypeError, match="tensor 1 has dtype torch.int64"):
        gradstats.get_total_norm([torch.ones(2), torch.ones(2, dtype=torch.int64)])


def test_complex_grads_match_torch():
    grads = [torch.randn(5, dtype=torch.complex64), torch.randn(3)]
    torch.testing.assert_close(gradstats.get_total_norm(grads),
                               torch.nn.utils.get_total_norm(grads))


def test_one_import_swaps_every_clipping_function():
    for name in ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]:
        assert callable(getattr(gradstats, name))
    assert gradstats.clip_grad_norm_ is gradstats.fused_clip_grad_norm_


def test_fp16_total_that_overflows_fp16_raises(backend_device):
    params = make_params([4], torch.float16, backend_device)
    params[0].grad.fill_(60000.0)  # norm 120000 > fp16 max: torch returns and checks inf
    before = params[0].grad.clone()
    with pytest.raises(RuntimeError, match="overflowed torch.float16"):
        gradstats.fused_clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert torch.equal(params[0].grad, before)


def test_float64_max_norm_beyond_float32_range_matches_torch(backend_device):
    for values in ([1e305, 1e305], [1.0, float("inf")]):
        ours = with_grads([torch.tensor(values, dtype=torch.float64, device=backend_device)])
        theirs = clone_params(ours)
        total = gradstats.fused_clip_grad_norm_(ours, 1e300)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1e300)
        torch.testing.assert_close(total, expected, equal_nan=True)
        torch.testing.assert_close(ours[0].grad, theirs[0].grad, equal_nan=True)


def test_tensor_listed_twice_is_updated_once(backend_device):
    grad = torch.tensor([4.0, -9.0, 0.5], device=backend_device)
    params = with_grads([grad])
    gradstats.clip_grad_value_([params[0], params[0]], 1.0)
    assert grad.tolist() == [1.0, -1.0, 0.5]
    grad.copy_(torch.tensor([3.0, 4.0, 0.0]))
    # The norm counts the tensor twice, as torch does; the update happens once.
    coef_once = torch.tensor([3.0, 4.0, 0.0]) * (1.0 / (math.sqrt(50.0) + 1e-6))
    gradstats.fused_clip_grad_norm_([params[0], params[0]], 1.0)
    torch.testing.assert_close(grad.cpu(), coef_once)


# Errors name the parameter the caller passed, counted among all parameters.

def _grad_with_nan_after_a_gradless_parameter(device):
    no_grad = torch.nn.Parameter(torch.ones(3, device=device))
    with_nan = torch.nn.Parameter(torch.ones(3, device=device))
    with_nan.grad = torch.tensor([1.0, float("nan"), 2.0], device=device)
    return [no_grad, with_nan]


def test_error_if_nonfinite_counts_parameters_without_grad(backend_device):
    params = _grad_with_nan_after_a_gradless_parameter(backend_device)
    with pytest.raises(RuntimeError, match=r"gradients of: parameter 1 \(1 NaN/Inf\)\.$"):
        gradstats.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert params[1].grad[1].isnan()  # nothing modified


def test_dtype_error_counts_parameters_without_grad():
    params = [torch.ones(3), torch.ones(3, dtype=torch.int64)]
    params[1].grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"^the gradient of parameter 1 has dtype torch.int64"):
        gradstats.clip_grad_norm_(params, 1.0)


def test_get_total_norm_dtype_error_names_the_tensor_not_a_gradient():
    with pytest.raises(TypeError, match=r"^tensor 1 has dtype torch.int64"):
        gradstats.get_total_norm([torch.ones(2), torch.ones(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"^tensor 'b' has dtype torch.int64"):
        gradstats.get_total_norm([("a", torch.ones(2)), ("b", torch.ones(2, dtype=torch.int64))])


# Bad input is rejected before the first gradient changes, on every backend.

def _sparse_grad(device):
    return torch.sparse_coo_tensor([[0, 2]], [5.0, -7.0], (4,), device=device)


@pytest.mark.parametrize("p", COMPOSED_NORM_TYPES)
def test_sparse_grads_with_composed_norm_type_raise_one_clear_line(backend_device, p):
    dense = torch.full((3,), 5.0, device=backend_device)
    params = with_grads([dense, _sparse_grad(backend_device)])
    for call in (lambda: gradstats.clip_grad_norm_(params, 1.0, p),
                 lambda: gradstats.grad_stats(params, p, max_norm=1.0)):
        with pytest.raises(ValueError, match=r"^sparse gradients need norm_type > 0.*"
                                             r"the gradient of parameter 1 is torch.sparse_coo"):
            call()
    with pytest.raises(ValueError, match=r"tensor 1 is torch.sparse_coo"):
        gradstats.get_total_norm([dense, _sparse_grad(backend_device)], p)
    assert dense.tolist() == [5.0] * 3


@pytest.mark.parametrize("shape", [(2,), (1,), (1, 1)])
def test_clip_grads_with_norm_rejects_non_scalar_total_before_scaling(backend_device, shape):
    grad = torch.full((3,), 10.0, device=backend_device)
    total_norm = torch.full(shape, 20.0, device=backend_device)
    with pytest.raises(RuntimeError, match="scalar tensor expected to be 0 dim"):
        torch.nn.utils.clip_grads_with_norm_(with_grads([grad.clone()]), 1.0, total_norm)
    with pytest.raises(RuntimeError, match="total_norm: scalar tensor expected to be 0 dim"):
        gradstats.clip_grads_with_norm_(with_grads([grad]), 1.0, total_norm)
    assert grad.tolist() == [10.0] * 3


@pytest.mark.parametrize("odd", ["sparse", "complex"])
def test_clip_grad_value_checks_every_grad_before_clamping(backend_device, odd):
    dense = torch.full((3,), 5.0, device=backend_device)
    other = (_sparse_grad(backend_device) if odd == "sparse"
             else torch.ones(3, dtype=torch.complex64, device=backend_device))
    for grads in ([dense, other], [other, dense]):
        with pytest.raises(NotImplementedError, match=f"clamp is not supported for {odd}"):
            gradstats.clip_grad_value_(with_grads(grads), 1.0)
        assert dense.tolist() == [5.0] * 3


@pytest.mark.parametrize("dtype,clip_value", [
    (torch.float16, 65519.0), (torch.float16, 1e5), (torch.bfloat16, 3.39e38),
    (torch.float32, 3.4028235677973366e38), (torch.float32, 1e40),
])
def test_clip_value_beyond_dtype_range_raises_like_torch(backend_device, dtype, clip_value):
    with pytest.raises(RuntimeError, match="cannot be converted to type"):
        torch.nn.utils.clip_grad_value_(with_grads([torch.ones(2, dtype=dtype)]), clip_value)
    # float64 holds any finite bound: only the second gradient can be the one named.
    first = torch.full((3,), 5.0, dtype=torch.float64, device=backend_device)
    grads = [first, torch.ones(2, dtype=dtype, device=backend_device)]
    with pytest.raises(RuntimeError, match=f"cannot be converted to type {dtype} without "
                                           r"overflow \(the gradient of parameter 1"):
        gradstats.clip_grad_value_(with_grads(grads), clip_value)
    assert first.tolist() == [5.0] * 3


@pytest.mark.parametrize("dtype,clip_value", [
    (torch.float16, 65504.0), (torch.float16, math.inf), (torch.bfloat16, 1e5),
    (torch.float32, 3.4028234663852886e38), (torch.float64, 1e300),
])
def test_clip_value_at_dtype_range_is_accepted_like_torch(backend_device, dtype, clip_value):
    ours = with_grads([torch.tensor([-3.0, 0.5, 7.0], dtype=dtype, device=backend_device)])
    theirs = clone_params(ours)
    gradstats.clip_grad_value_(ours, clip_value)
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    assert torch.equal(ours[0].grad, theirs[0].grad)


# In-place updates of gradients that share memory: every listed view is updated as torch
# updates it (an element shared by two different views is scaled twice), except a view
# listed twice, which is updated once (README).

def _overlapping_grads(layout, device):
    buffer = torch.arange(1.0, 13.0, device=device) * torch.tensor([1.0, -1.0] * 6, device=device)
    other = torch.full((5,), 4.0, device=device)  # overlaps nothing: the parallel path
    views = {
        "prefix_first": [buffer[:5], buffer],
        "prefix_last": [buffer, buffer[:5]],
        "shifted": [buffer[:6], buffer[4:]],
        "reshaped": [buffer.view(3, 4), buffer[2:9]],
        "strided": [buffer[::2], buffer[1::2], buffer[:7]],
    }[layout]
    return buffer, views + [other]


OVERLAP_LAYOUTS = ["prefix_first", "prefix_last", "shifted", "reshaped", "strided"]

CLIP_CALLS = {
    "clip_grad_norm_": (lambda ps: gradstats.clip_grad_norm_(ps, 1.0),
                        lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0)),
    "grad_stats": (lambda ps: gradstats.grad_stats(ps, max_norm=1.0),
                   lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0)),
    "clip_grads_with_norm_": (lambda ps: gradstats.clip_grads_with_norm_(ps, 1.0,
                                                                         torch.tensor(30.0)),
                              lambda ps: torch.nn.utils.clip_grads_with_norm_(
                                  ps, 1.0, torch.tensor(30.0))),
    "clip_grad_value_": (lambda ps: gradstats.clip_grad_value_(ps, 2.5),
                         lambda ps: torch.nn.utils.clip_grad_value_(ps, 2.5)),
}


@pytest.mark.parametrize("call", list(CLIP_CALLS))
@pytest.mark.parametrize("layout", OVERLAP_LAYOUTS)
def test_overlapping_grads_are_updated_like_torch(backend_device, layout, call):
    ours, theirs = CLIP_CALLS[call]
    buffer, grads = _overlapping_grads(layout, backend_device)
    their_buffer, their_grads = _overlapping_grads(layout, "cpu")
    ours(with_grads(grads))
    theirs(with_grads(their_grads))
    # Our total norm is accumulated differently from torch's, so the coefficient may
    # differ in its last bits; an element scaled twice differs by twice that.
    torch.testing.assert_close(buffer.cpu(), their_buffer, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[-1].cpu(), their_grads[-1], rtol=1e-6, atol=0)
    if call != "clip_grad_value_":
        # Every element was scaled at least once: nothing is left at its old value.
        assert (buffer.abs().cpu() < _overlapping_grads(layout, "cpu")[0].abs()).all()


@pytest.mark.parametrize("call", list(CLIP_CALLS))
def test_identical_views_are_updated_once_beside_overlapping_ones(backend_device, call):
    ours, _ = CLIP_CALLS[call]
    buffer = torch.full((10,), 3.0, device=backend_device)
    ours(with_grads([buffer[:5], buffer, buffer[:5], buffer.view(2, 5), buffer.view(2, 5)]))
    # Three different views: the first five elements are updated three times (by buffer[:5],
    # buffer and buffer.view(2, 5)), the rest twice. The norm counts every listed tensor:
    # 9 * (5 + 10 + 5 + 10 + 10) = 360.
    coef = {"clip_grads_with_norm_": 1.0 / (30.0 + 1e-6)}.get(call, 1.0 / (360 ** 0.5 + 1e-6))
    update = (lambda x: min(x, 2.5)) if call == "clip_grad_value_" else (lambda x: x * coef)
    expected = [update(update(update(3.0)))] * 5 + [update(update(3.0))] * 5
    torch.testing.assert_close(buffer.cpu(), torch.tensor(expected), rtol=1e-5, atol=0)


def test_update_targets_split():
    from gradstats.worklist import update_targets
    buffer = torch.zeros(12)
    other = torch.zeros(3)
    tensors = [buffer[:4], other, buffer, buffer[:4], torch.zeros(0), buffer[4:8].view(2, 2),
               other]
    parallel, one_by_one = update_targets(tensors)
    # other (listed twice: once) and the empty tensor overlap nothing; buffer[:4] (once),
    # buffer and its view overlap one another.
    assert parallel == [1, 4]
    assert one_by_one == [0, 2, 5]
    assert update_targets([buffer[:6], buffer[6:], other]) == ([0, 1, 2], [])


def test_clip_grads_with_norm_rejects_integer_grads_before_scaling(backend_device):
    floats = torch.full((3,), 10.0, device=backend_device)
    params = [torch.nn.Parameter(torch.zeros(3, device=backend_device)),
              torch.zeros(2, dtype=torch.int64, device=backend_device)]
    params[0].grad = floats
    params[1].grad = torch.ones(2, dtype=torch.int64, device=backend_device)
    with pytest.raises(TypeError, match="the gradient of parameter 1 has dtype torch.int64"):
        gradstats.clip_grads_with_norm_(params, 1.0, torch.tensor(20.0))
    assert floats.tolist() == [10.0] * 3


@pytest.mark.parametrize("call", list(CLIP_CALLS))
def test_expanded_grad_raises_before_anything_is_updated(backend_device, call):
    ours, theirs = CLIP_CALLS[call]
    expanded = torch.full((1, 3), 5.0, device=backend_device).expand(2, 3)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        theirs(with_grads([torch.full((3,), 5.0), expanded.cpu()]))
    first = torch.full((3,), 5.0, device=backend_device)
    with pytest.raises(RuntimeError, match=r"the gradient of parameter 1 is expanded"):
        ours(with_grads([first, expanded]))
    assert first.tolist() == [5.0] * 3


class _Records:
    def __init__(self, records):
        self.write = records.append


@pytest.mark.parametrize("clip", ["fused_clip_grad_norm_", "clip_grads_with_norm_", "grad_stats",
                                  "monitor"])
def test_infinite_max_norm_never_spreads_one_nan_to_every_gradient(backend_device, clip):
    """torch scales by clamp(inf / (nan + 1e-6), max=1) = nan, turning every gradient NaN
    (the Hugging Face Trainer measures its norm with max_norm=inf); gradstats leaves them."""
    finite = torch.nn.Parameter(torch.ones(3, device=backend_device))
    poisoned = torch.nn.Parameter(torch.ones(3, device=backend_device))
    finite.grad = torch.tensor([1.0, 2.0, 3.0], device=backend_device)
    poisoned.grad = torch.tensor([1.0, float("nan"), 2.0], device=backend_device)
    params = [finite, poisoned]
    if clip == "fused_clip_grad_norm_":
        assert gradstats.fused_clip_grad_norm_(params, math.inf).isnan()
    elif clip == "clip_grads_with_norm_":
        gradstats.clip_grads_with_norm_(params, math.inf, torch.tensor(math.nan))
    elif clip == "grad_stats":
        stats = gradstats.grad_stats(params, max_norm=math.inf)
        assert stats.nonfinite.tolist() == [0, 1] and stats.clip_coef.item() == 1.0
    else:
        records = []
        monitor = gradstats.GradMonitor(params, sinks=[_Records(records)], on_nonfinite="ignore")
        monitor.step(max_norm=math.inf)
        monitor.close()
        assert records[0].clip_coef == 1.0  # the factor applied: none
    assert torch.equal(finite.grad, torch.tensor([1.0, 2.0, 3.0], device=backend_device))
    assert poisoned.grad.isnan().tolist() == [False, True, False]
