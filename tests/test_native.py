"""The native C++ statistics pass (gradstats._C) against the reference twin and float64 NumPy."""
import math

import numpy as np
import pytest
import torch
from helpers import FLOAT_DTYPES, as_float64, np_histogram, np_power, with_grads

import gradstats
from gradstats import backend, native, reference
from gradstats.norms import norm_kind

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"{native.unavailable_reason()}")

NORM_TYPES = [2.0, 1.0, math.inf, 0.5, 3.0]
CHUNK = native.NATIVE_CHUNK
# Empty, one element, odd sizes around the 16-element inner step, one chunk exactly, and
# several chunks with a ragged tail.
SIZES = [0, 1, 15, 17, 1000, CHUNK, 3 * CHUNK + 5]


def mantissa_bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps))


def sample(n: int, dtype: torch.dtype, spread: bool) -> torch.Tensor:
    """Normal values; with ``spread`` their magnitudes span every binade of ``dtype``,
    subnormals included, with zeros mixed in."""
    values = torch.randn(n, dtype=torch.float64)
    if spread and n:
        finfo = torch.finfo(dtype)
        low = math.log2(finfo.smallest_normal) - mantissa_bits(dtype)
        high = math.log2(finfo.max) - 1
        values *= torch.exp2(torch.empty(n, dtype=torch.float64).uniform_(low, high))
        values[::7] = 0.0
    return values.to(dtype)


def stats_of(tensors, p, num_bins, min_exp, on_native):
    kind = norm_kind(p)
    if on_native:
        return native.cpu_stats(tensors, p, kind, num_bins, min_exp)
    return reference.accumulate_stats(tensors, p, kind, num_bins, min_exp)


def assert_power_close(got, expected, dtype, p):
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_power_and_counts_match_reference_and_float64(dtype, p):
    tensors = [sample(n, dtype, spread=False) for n in SIZES]
    power, nonfinite, hist = stats_of(tensors, p, 0, 0, on_native=True)
    ref_power, ref_nonfinite, _ = stats_of(tensors, p, 0, 0, on_native=False)
    assert_power_close(power, ref_power, dtype, p)
    expected = torch.tensor([np_power(as_float64(t), p) for t in tensors], dtype=torch.float64)
    assert_power_close(power, expected, dtype, p)
    assert nonfinite.tolist() == ref_nonfinite.tolist() == [0] * len(tensors)
    assert hist.shape == (len(tensors), 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("num_bins", [2, 64, 1024])
def test_histogram_is_exact_over_every_binade(dtype, num_bins):
    finfo = torch.finfo(dtype)
    lowest = round(math.log2(finfo.smallest_normal)) - mantissa_bits(dtype)  # smallest subnormal
    tensors = [sample(n, dtype, spread=True) for n in SIZES]
    for min_exp in (lowest - 3, lowest + 5, -30):  # below, inside and above the subnormals
        _, _, hist = stats_of(tensors, 2.0, num_bins, min_exp, on_native=True)
        _, _, ref_hist = stats_of(tensors, 2.0, num_bins, min_exp, on_native=False)
        expected = np.stack([np_histogram(as_float64(t), num_bins, min_exp) for t in tensors])
        np.testing.assert_array_equal(hist.numpy(), expected)
        np.testing.assert_array_equal(ref_hist.numpy(), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_nan_and_inf_are_counted_and_propagate(dtype, p):
    tensors = [sample(n, dtype, spread=False) for n in (5, 2 * CHUNK + 3, 100)]
    tensors[0][1] = math.nan
    tensors[1][CHUNK + 1] = math.inf
    tensors[1][7] = -math.inf
    tensors[1][-1] = math.nan
    power, nonfinite, hist = stats_of(tensors, p, 64, -20, on_native=True)
    ref_power, ref_nonfinite, ref_hist = stats_of(tensors, p, 64, -20, on_native=False)
    assert nonfinite.tolist() == ref_nonfinite.tolist() == [1, 3, 0]
    assert math.isnan(power[0]) and math.isnan(power[1])  # NaN wins over inf, for max too
    assert_power_close(power[2:], ref_power[2:], dtype, p)
    assert torch.equal(hist, ref_hist)
    assert hist[1].sum() == tensors[1].numel() - 3  # non-finite values are not binned


def test_float32_chunk_sum_overflows_like_the_kernels():
    big = torch.full((10,), 1e20)  # squares overflow float32; float64 would not
    power, _, _ = stats_of([big], 2.0, 0, 0, on_native=True)
    ref_power, _, _ = stats_of([big], 2.0, 0, 0, on_native=False)
    assert math.isinf(power[0]) and math.isinf(ref_power[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_histogram_of_subnormals_ignores_flush_to_zero(dtype):
    # Under torch.set_flush_denormal(True) float arithmetic on a subnormal gives 0; the
    # columns come from the bits alone, so they are exact, with any thread count.
    finfo = torch.finfo(dtype)
    lowest = round(math.log2(finfo.smallest_normal)) - mantissa_bits(dtype)
    tensors = [sample(n, dtype, spread=True) for n in (3 * CHUNK + 5, 17)]
    expected = np.stack([np_histogram(as_float64(t), 64, lowest - 3) for t in tensors])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        _, _, hist = stats_of(tensors, 1.0, 64, lowest - 3, on_native=True)
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(hist.numpy(), expected)


@pytest.mark.parametrize("num_bins", [0, 64])
def test_bit_identical_whatever_the_thread_count(num_bins):
    tensors = [sample(n, dtype, spread=False) for n in (7 * CHUNK + 11, 5, CHUNK)
               for dtype in (torch.float32, torch.bfloat16)]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            results.append(stats_of(tensors, 2.0, num_bins, -20, on_native=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_opcheck():
    tensors = [sample(n, torch.float32, spread=False) for n in (3, CHUNK + 1)]
    tensors.append(sample(9, torch.bfloat16, spread=False))
    for p, num_bins in ((2.0, 64), (math.inf, 0)):
        torch.library.opcheck(torch.ops.gradstats.cpu_stats.default,
                              (tensors, p, int(norm_kind(p)), num_bins, -20))


def test_rejects_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="contiguous"):
        native.cpu_stats([torch.ones(4, 4).t()], 2.0, norm_kind(2.0), 0, 0)
    with pytest.raises(RuntimeError, match="float32"):
        native.cpu_stats([torch.ones(4, dtype=torch.int32)], 2.0, norm_kind(2.0), 0, 0)


def test_auto_and_native_choose_it_for_cpu_and_torch_forces_the_reference(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "auto")
    assert backend.choose_backend(torch.device("cpu")) is backend.Backend.NATIVE
    assert gradstats.backend_info()["cpu"] == "native C++ (gradstats._C)"
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    assert backend.choose_backend(torch.device("cpu")) is backend.Backend.NATIVE
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        backend.choose_backend(torch.device("cuda"))
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    assert backend.choose_backend(torch.device("cpu")) is backend.Backend.TORCH
    assert "GRADSTATS_BACKEND=torch" in backend.backend_info()["cpu"]


def test_grad_stats_mixes_native_and_reference_tensors(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    grads = [torch.randn(300, 70), torch.randn(70, 300).t(), torch.randn(50).bfloat16(),
             torch.randn(6, dtype=torch.complex64)]
    grads[2][3] = math.inf
    stats = gradstats.grad_stats(with_grads(grads), num_bins=64, min_exp=-20)
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    expected = gradstats.grad_stats(with_grads(grads), num_bins=64, min_exp=-20)
    torch.testing.assert_close(stats.norms, expected.norms, rtol=1e-6, atol=0.0)
    assert torch.equal(stats.nonfinite, expected.nonfinite)
    assert torch.equal(stats.hist, expected.hist)


def test_native_requested_but_not_built_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "gradstats._C not built: test")
    monkeypatch.setenv("GRADSTATS_BACKEND", "auto")
    assert backend.choose_backend(torch.device("cpu")) is backend.Backend.TORCH
    assert backend.backend_info()["cpu"] == "PyTorch reference (gradstats._C not built: test)"
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    with pytest.raises(RuntimeError, match="not built: test"):
        gradstats.grad_stats(with_grads([torch.ones(3)]))
