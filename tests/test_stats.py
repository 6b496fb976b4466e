"""grad_stats: every field against an independent float64 NumPy reference."""
import math
import types

import numpy as np
import pytest
import torch
from helpers import (
    FLOAT_DTYPES,
    FUSED_NORM_TYPES,
    as_float64,
    make_grads,
    make_params,
    norm_rtol,
    np_histogram,
    np_norm,
    np_total_norm,
    with_grads,
)

import gradstats

ODD_SIZES = [0, 1, 7, 131, 4099]


def check_stats(stats, grads, p, device, num_bins=64, min_exp=-40, norms=True):
    arrays = [as_float64(g) for g in grads]
    dtype = grads[0].dtype
    if norms:
        check_norms(stats, arrays, dtype, p, device)
    nonfinite = [int(np.sum(~np.isfinite(a))) for a in arrays]
    assert stats.nonfinite.tolist() == nonfinite
    assert stats.numel.tolist() == [a.size for a in arrays]
    if stats.hist is not None:
        expected = np.stack([np_histogram(a, num_bins, min_exp) for a in arrays])
        np.testing.assert_array_equal(stats.hist.cpu().numpy(), expected)


def check_norms(stats, arrays, dtype, p, device):
    expected_norms = torch.tensor([np_norm(a, p) for a in arrays], dtype=torch.float64)
    rtol = norm_rtol(dtype, p, device)
    torch.testing.assert_close(stats.norms.cpu().double(), expected_norms, rtol=rtol, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(stats.total_norm.cpu().double(),
                               torch.tensor(np_total_norm(arrays, p), dtype=torch.float64),
                               rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", FUSED_NORM_TYPES)
def test_fields_match_float64_reference(backend_device, dtype, p):
    grads = make_grads(ODD_SIZES, dtype, backend_device, scale=3.0)
    stats = gradstats.grad_stats(with_grads(grads), p)
    check_stats(stats, grads, p, backend_device)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.norms.dtype == stats.total_norm.dtype == expected_dtype
    assert stats.nonfinite.dtype == stats.hist.dtype == stats.numel.dtype == torch.int64
    assert stats.norms.device.type == stats.hist.device.type == backend_device.type


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_inf_counted_and_kept_out_of_histogram(backend_device, dtype):
    grads = make_grads([50, 1, 300], dtype, backend_device)
    grads[0][[3, 7]] = float("nan")
    grads[0][11] = float("inf")
    grads[2][0] = -float("inf")
    stats = gradstats.grad_stats(with_grads(grads))
    assert stats.nonfinite.tolist() == [3, 0, 1]
    assert stats.hist.sum(1).tolist() == [47, 1, 299]
    assert math.isnan(stats.norms[0].item()) and math.isinf(stats.norms[2].item())
    assert math.isnan(stats.total_norm.item())
    check_stats(stats, grads, 2.0, backend_device)


def test_inf_norm_propagates_nan_like_torch(backend_device):
    grads = make_grads([5, 9], torch.float32, backend_device)
    grads[1][4] = float("nan")
    grads[0][0] = float("inf")
    stats = gradstats.grad_stats(with_grads(grads), math.inf)
    assert math.isinf(stats.norms[0].item()) and math.isnan(stats.norms[1].item())
    assert math.isnan(stats.total_norm.item())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_histogram_edges_zeros_and_out_of_range(backend_device, dtype):
    finfo = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -1.0, 1.5, 2.0, 0.75, 2.0**-40, 2.0**-41, 2.0**22, 2.0**23,
              finfo.tiny, finfo.max, -finfo.max, finfo.smallest_normal / 4, 3e-3]
    grad = torch.tensor(values, dtype=torch.float64).to(dtype).to(backend_device)
    stats = gradstats.grad_stats(with_grads([grad]))
    # Squares of dtype-max values overflow a float32 sum, as in torch: histogram only.
    check_stats(stats, [grad], 2.0, backend_device, norms=False)
    assert stats.hist[0, 0].item() == int((grad == 0).sum()) >= 2


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_bins,min_exp", [(64, -40), (50, -10), (256, -160), (8, 0),
                                              (2, -1), (128, -1100)])
def test_histogram_ranges_exact_for_subnormals(backend_device, dtype, num_bins, min_exp):
    finfo = torch.finfo(dtype)
    subnormal = finfo.smallest_normal / 2**5
    grad = torch.cat([
        torch.tensor([subnormal, finfo.smallest_normal / 2, finfo.smallest_normal, 0.0,
                      finfo.max, float("nan"), float("inf")], dtype=torch.float64).to(dtype),
        (torch.randn(400, dtype=torch.float64) * 10 ** torch.randint(-12, 8, (400,))).to(dtype),
    ]).to(backend_device)
    stats = gradstats.grad_stats(with_grads([grad]), num_bins=num_bins, min_exp=min_exp)
    check_stats(stats, [grad], 2.0, backend_device, num_bins=num_bins, min_exp=min_exp,
                norms=False)


def test_histogram_off_returns_none_and_same_norms(backend_device):
    grads = make_grads([100, 3], torch.float32, backend_device)
    with_hist = gradstats.grad_stats(with_grads(grads))
    without = gradstats.grad_stats(with_grads(grads), histogram=False)
    assert without.hist is None
    assert torch.equal(with_hist.norms, without.norms)
    assert torch.equal(with_hist.nonfinite, without.nonfinite)


def test_chunk_and_block_edges(backend_device, small_chunks):
    chunk, block = small_chunks.chunk, small_chunks.block
    sizes = [chunk - 1, chunk, chunk + 1, block - 1, block, block + 1, 3 * chunk + 5, 1, 0]
    for dtype in (torch.float32, torch.bfloat16):
        grads = make_grads(sizes, dtype, backend_device)
        grads[2][chunk] = float("nan")  # the one element of the last chunk
        check_stats(gradstats.grad_stats(with_grads(grads)), grads, 2.0, backend_device)
        check_stats(gradstats.grad_stats(with_grads(grads), math.inf), grads, math.inf,
                    backend_device)


def test_many_tensors_mixed_dtypes(backend_device, small_chunks):
    sizes = [(i * 37) % 700 for i in range(320)]
    grads = []
    for i, size in enumerate(sizes):
        grads += make_grads([size], FLOAT_DTYPES[i % 3], backend_device)
    stats = gradstats.grad_stats(with_grads(grads))
    arrays = [as_float64(g) for g in grads]
    expected = torch.tensor([np_norm(a, 2.0) for a in arrays], dtype=torch.float64)
    torch.testing.assert_close(stats.norms.cpu().double(), expected, rtol=2e-5, atol=0)
    expected_hist = np.stack([np_histogram(a, 64, -40) for a in arrays])
    np.testing.assert_array_equal(stats.hist.cpu().numpy(), expected_hist)


def test_one_plan_serves_changing_options_call_after_call(backend_device, small_chunks):
    """The same gradients, with the norm type and histogram options changing between calls:
    each call's launch arguments (kept per plan and options) are its own."""
    grads = [g for dtype in (torch.float32, torch.bfloat16, torch.float64)
             for g in make_grads([300, 7, 1000], dtype, backend_device)]
    params = with_grads(grads)
    for p, num_bins, min_exp in [(2.0, 16, -20), (1.0, 64, -40), (math.inf, 16, -20),
                                 (3.0, 8, -6), (2.0, 0, 0), (2.0, 16, -20)]:
        stats = gradstats.grad_stats(params, p, histogram=num_bins > 0,
                                     num_bins=num_bins or 64, min_exp=min_exp)
        for rows in (slice(0, 3), slice(3, 6), slice(6, 9)):  # one dtype each
            part = types.SimpleNamespace(
                nonfinite=stats.nonfinite[rows], numel=stats.numel[rows],
                hist=None if stats.hist is None else stats.hist[rows])
            check_stats(part, grads[rows], p, backend_device, num_bins or 64, min_exp,
                        norms=False)
            expected = torch.tensor([np_norm(as_float64(g), p) for g in grads[rows]],
                                    dtype=torch.float64)
            torch.testing.assert_close(
                stats.norms[rows].cpu().double(), expected, atol=0,
                rtol=norm_rtol(grads[rows][0].dtype, p, backend_device))
        expected_total = np_total_norm([as_float64(g) for g in grads], p)
        assert stats.total_norm.item() == pytest.approx(expected_total, rel=1e-5)


def test_mixed_with_float64_gives_float64_norms(backend_device):
    grads = make_grads([10], torch.float64, backend_device) + make_grads([20], torch.bfloat16,
                                                                          backend_device)
    stats = gradstats.grad_stats(with_grads(grads))
    assert stats.norms.dtype == torch.float64


def test_non_contiguous_grads(backend_device):
    base = torch.randn(40, 30, device=backend_device)
    transposed = base.t()  # dense, permuted: read in place
    gapped = base[:, ::3]  # strided with gaps: the reference path
    channels_last = torch.randn(2, 3, 5, 7, device=backend_device).to(
        memory_format=torch.channels_last)
    grads = [transposed, gapped, channels_last]
    check_stats(gradstats.grad_stats(with_grads(grads)), grads, 2.0, backend_device)


def test_none_grads_skipped_and_names_kept(backend_device):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model.to(backend_device)
    model(torch.randn(5, 4, device=backend_device)).sum().backward()
    model[0].bias.grad = None
    stats = gradstats.grad_stats(model)
    assert stats.names == ["0.weight", "2.weight", "2.bias"]
    grads = [model[0].weight.grad, model[2].weight.grad, model[2].bias.grad]
    check_stats(stats, grads, 2.0, backend_device)
    assert gradstats.grad_stats(model.named_parameters()).names == stats.names
    assert gradstats.grad_stats(list(model.parameters())).names is None


def test_no_grads_gives_empty_stats():
    param = torch.nn.Parameter(torch.randn(3))
    stats = gradstats.grad_stats([param])
    assert len(stats) == 0 and stats.total_norm.item() == 0.0 and stats.hist.shape == (0, 64)


def test_max_norm_clips_like_fused_clip(backend_device):
    params = make_params([100, 7, 0], torch.float32, backend_device, scale=5.0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for twin, param in zip(twins, params):
        twin.grad = param.grad.clone()
    stats = gradstats.grad_stats(params, max_norm=1.0)
    total = gradstats.fused_clip_grad_norm_(twins, 1.0)
    torch.testing.assert_close(stats.total_norm, total)
    assert stats.clip_coef.item() < 1.0
    for param, twin in zip(params, twins):
        assert torch.equal(param.grad, twin.grad)
    assert gradstats.grad_stats(params).clip_coef is None


def test_deterministic_bit_identical(backend_device, small_chunks):
    grads = make_grads([5000, 333, 1], torch.float32, backend_device, scale=1e3)
    first = gradstats.grad_stats(with_grads(grads), 3.5)
    for _ in range(2):
        again = gradstats.grad_stats(with_grads(grads), 3.5)
        assert torch.equal(first.norms, again.norms)
        assert torch.equal(first.total_norm, again.total_norm)
        assert torch.equal(first.hist, again.hist)


def test_bin_edges():
    stats = gradstats.grad_stats([torch.nn.Parameter(torch.ones(1))], num_bins=4, min_exp=-2)
    assert stats.bin_edges().tolist() == [0.0, 0.25, 0.5, 1.0, 2.0]


@pytest.mark.parametrize("kwargs,error", [
    (dict(num_bins=1), ValueError), (dict(num_bins=5000), ValueError),
    (dict(min_exp=2.5), ValueError), (dict(norm_type=float("nan")), ValueError),
    (dict(norm_type="fro"), ValueError), (dict(max_norm=-1.0), ValueError),
    (dict(max_norm=float("nan")), ValueError),
])
def test_bad_arguments(kwargs, error):
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    with pytest.raises(error):
        gradstats.grad_stats([param], **kwargs)
    assert torch.equal(param.grad, torch.ones(3))


def test_integer_gradient_is_named():
    with pytest.raises(TypeError, match="'w'.*torch.int64"):
        param = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        param.grad = None
        bad = torch.ones(2, dtype=torch.int64)
        fake = type("P", (), {"grad": bad})()
        from gradstats.checks import check_norm_inputs
        check_norm_inputs([fake.grad], ["w"], "parameter")


# The reference path sums powers per kernel chunk, like the kernels: accurate, and it
# overflows where they do.

def _wide_range_values(numel: int, dtype=torch.float32) -> torch.Tensor:
    magnitudes = 10 ** torch.empty(numel, dtype=torch.float64).uniform_(-3, 3)
    return (torch.randn(numel, dtype=torch.float64) * magnitudes).to(dtype)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_cpu_norm_of_a_large_fp32_tensor_is_accurate(monkeypatch, p):
    # torch's float32 vector_norm of 1M such values is off by up to 5e-4 (4e-3 at 8M).
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    grad = _wide_range_values(1_000_003)
    stats = gradstats.grad_stats(with_grads([grad]), p, histogram=False)
    expected = np_norm(as_float64(grad), p)
    # The 2-norm takes torch's float32 vector_norm per chunk (about 1e-6); the others are
    # pairwise float32 sums per chunk (about 1e-9).
    assert stats.norms[0].item() == pytest.approx(expected, rel=2e-6 if p == 2 else 1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
def test_backends_agree_across_chunks(backend_device, small_chunks, dtype, p):
    grads = [_wide_range_values(n, dtype).to(backend_device) for n in (3 * 256 + 5, 256, 9)]
    stats = gradstats.grad_stats(with_grads(grads), p, histogram=False)
    expected = torch.tensor([np_norm(as_float64(g), p) for g in grads], dtype=torch.float64)
    torch.testing.assert_close(stats.norms.cpu().double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_fp32_chunk_power_overflow_gives_inf_on_every_backend(backend_device, p):
    # 1e20 ** 2 overflows float32: the kernels' accumulator is inf, and the reference's
    # too (torch returns 1e20 for a lone element; README Limits).
    params = with_grads([torch.tensor([1e20], device=backend_device)])
    assert gradstats.get_total_norm([params[0].grad], p).item() == math.inf
    gradstats.clip_grad_norm_(params, 1.0, p)
    assert params[0].grad.tolist() == [0.0]
