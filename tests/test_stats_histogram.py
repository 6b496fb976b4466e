"""The log2-magnitude histogram under adversarial exponent spreads, against the float64
NumPy reference (helpers.np_histogram). On GPUs the histogram is counted in per-thread
shared-memory counters; in the interpreter by tl.histogram: both share the column math
these tests pin down (zeros, clamping at both ends, subnormals, non-finite values). The
GPU path's compiled loop (one shared atomic per element, no vote or barrier) is checked by
the compile gate, tests/test_gpu_compile.py."""
import numpy as np
import pytest
import torch
from helpers import FLOAT_DTYPES, as_float64, np_histogram, with_grads

import gradstats


def check_histogram(grads, num_bins, min_exp):
    stats = gradstats.grad_stats(with_grads(grads), num_bins=num_bins, min_exp=min_exp)
    expected = np.stack([np_histogram(as_float64(g), num_bins, min_exp) for g in grads])
    np.testing.assert_array_equal(stats.hist.cpu().numpy(), expected)
    return stats.hist


def exponent_range(dtype):
    """floor(log2) of the smallest subnormal and of the largest finite value of ``dtype``."""
    finfo = torch.finfo(dtype)
    mantissa_bits = round(-np.log2(finfo.eps))
    return round(np.log2(finfo.smallest_normal)) - mantissa_bits, int(np.floor(np.log2(finfo.max)))


def every_column(dtype, num_bins, min_exp):
    """One value inside every column's binade that ``dtype`` can hold, both edges of it,
    values below and above the range, zeros of both signs, NaN and infinities."""
    finfo = torch.finfo(dtype)
    lowest, highest = exponent_range(dtype)
    exponents = torch.tensor(range(max(min_exp, lowest), min(min_exp + num_bins - 1, highest + 1)),
                             dtype=torch.float64)
    powers = torch.exp2(exponents)
    values = torch.cat([
        powers, -powers * 1.5, powers * (2 - finfo.eps),  # binade start, middle, end
        torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, finfo.smallest_normal / 2,
                      2.0**lowest, float("nan"), float("inf"), -float("inf")],
                     dtype=torch.float64),
    ]).to(dtype)
    return values[torch.randperm(values.numel())]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_bins,min_exp", [(64, -40), (2, -1), (1024, -200), (1024, -1100),
                                              (300, -150)])
def test_every_column_hit(triton_device, small_chunks, dtype, num_bins, min_exp):
    grad = every_column(dtype, num_bins, min_exp).to(triton_device)
    hist = check_histogram([grad, grad.flip(0)], num_bins, min_exp)
    lowest, highest = exponent_range(dtype)
    representable = range(max(min_exp, lowest) - min_exp + 1,
                          min(min_exp + num_bins - 1, highest + 1) - min_exp + 1)
    assert all(hist[0, column] > 0 for column in representable)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value", [1.5, -3e-3, 0.0, 2.0**-130, 2.0**100])
def test_all_in_one_column(triton_device, small_chunks, dtype, value):
    # Every element of every block in the same bin: the worst case for shared counters.
    grad = torch.full((3 * small_chunks.chunk + 5,), value, dtype=torch.float64).to(dtype)
    check_histogram([grad.to(triton_device)], 64, -40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("min_exp", [-127, -126, -125, -160])
def test_subnormals_at_the_normal_range_edge(triton_device, dtype, min_exp):
    # -126 is the smallest fp32/bf16 exponent for which zeros reach column 0 through the
    # lower clamp (no exponent rescaling); -127 and below rescale subnormals.
    finfo = torch.finfo(dtype)
    subnormals = finfo.smallest_normal * torch.exp2(-torch.arange(0, 60.0))
    grad = torch.cat([subnormals, -subnormals, torch.zeros(5, dtype=torch.float64),
                      torch.tensor([finfo.smallest_normal, 2 * finfo.smallest_normal, 1.0])])
    check_histogram([grad.to(dtype).to(triton_device)], 64, min_exp)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_only_zeros_and_non_finite(triton_device, dtype):
    grad = torch.tensor([0.0, float("nan"), -0.0, float("inf"), -float("inf")] * 7,
                        dtype=torch.float64).to(dtype).to(triton_device)
    hist = check_histogram([grad], 64, -40)
    assert hist[0].tolist() == [14] + [0] * 63


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_random_spread_across_chunks(triton_device, small_chunks, dtype):
    magnitudes = torch.exp2(torch.randint(-160, 140, (5000,)).double())
    grad = magnitudes * torch.where(torch.rand(5000) < 0.5, -1.0, 1.0).double()
    grad[torch.randint(0, 5000, (200,))] = 0.0
    grad[torch.randint(0, 5000, (20,))] = float("nan")
    check_histogram([grad.to(dtype).to(triton_device)], 1024, -200)

