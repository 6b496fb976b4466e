"""The native C++ statistics pass (gradstats._C) against the reference twin and float64 NumPy."""
import math

import numpy as np
import pytest
import torch
from helpers import FLOAT_DTYPES, as_float64, np_histogram, np_power, with_grads

import gradstats
from gradstats import backend, dispatch, native, reference
from gradstats.norms import norm_kind

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"{native.unavailable_reason()}")

NORM_TYPES = [2.0, 1.0, math.inf, 0.5, 3.0]
CHUNK = native.NATIVE_CHUNK
# Empty, one element, odd sizes around the 16-element inner step, one chunk exactly, and
# several chunks with a ragged tail.
SIZES = [0, 1, 15, 17, 1000, CHUNK, 3 * CHUNK + 5]
# Around the histogram's 64-element vector step and 4096-element sub-block, and the chunk.
EDGE_SIZES = [63, 64, 65, 4095, 4096, 4097, CHUNK - 1, CHUNK, CHUNK + 1]
# GRADSTATS_NATIVE_HISTOGRAM: "scalar" forces the scalar exponent count; "auto" (anything
# else) counts in AVX-512 lanes where the CPU can.
COUNTING = ["auto", "scalar"]


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


def extremes(dtype: torch.dtype) -> list[torch.Tensor]:
    """Tensors at the ends of the exponent range: all zeros, all NaN, all Inf, only
    subnormals, only the largest binade, and zeros, subnormals, huge values and NaN/Inf
    mixed in one chunk (a block whose exponent range is as wide as the dtype's)."""
    finfo = torch.finfo(dtype)
    tiny = finfo.smallest_normal * finfo.eps  # the smallest subnormal
    n = CHUNK + 1
    subnormals = (torch.arange(n, dtype=torch.float64) % 64 + 1) * tiny
    huge = torch.full((n,), finfo.max, dtype=torch.float64) / (torch.arange(n) % 3 + 1)
    mixed = sample(n, dtype, spread=True).to(torch.float64)
    mixed[::97], mixed[1::89], mixed[2::83] = finfo.max, math.nan, -math.inf
    mixed[3::79] = tiny
    values = [torch.zeros(n), torch.full((n,), math.nan), torch.full((n,), -math.inf),
              subnormals, -huge, mixed]
    return [v.to(dtype) for v in values]


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


@pytest.mark.parametrize("num_bins", [2, 64])
def test_histogram_rows_are_exact_in_reused_memory(num_bins):
    """The histogram's rows are not zero-filled up front (each one-chunk tensor's row is
    zeroed by its chunk, the others when the pass is planned): in memory the allocator
    hands back dirty, every row (no chunk, one, several) must still be exact."""
    tensors = [sample(n, torch.float32, spread=True) for n in SIZES * 3]
    rows = len(tensors) * num_bins
    for _ in range(3):
        dirty = torch.full((rows,), -(2**62), dtype=torch.int64)  # freed just before the pass
        del dirty
        _, _, hist = stats_of(tensors, 2.0, num_bins, -30, on_native=True)
        expected = np.stack([np_histogram(as_float64(t), num_bins, -30) for t in tensors])
        np.testing.assert_array_equal(hist.numpy(), expected)


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
    power, nonfinite, _ = stats_of([big], 2.0, 0, 0, on_native=True)
    ref_power, _, _ = stats_of([big], 2.0, 0, 0, on_native=False)
    assert math.isinf(power[0]) and math.isinf(ref_power[0])
    assert nonfinite.tolist() == [0]  # an overflowing power is no NaN/Inf element


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("p", [*NORM_TYPES, 1e-50])  # 1e-50: 0 in float32, and NaN^0 = 1
def test_nonfinite_counts_where_the_power_overflows_or_holds_nan(dtype, p):
    """NaN/Inf are counted only in chunks whose power is not finite: chunks of huge finite
    values (the power overflows: none to count), of NaN and Inf at scattered positions,
    and of both, each counted as the reference counts them."""
    finfo = torch.finfo(dtype)
    n = 2 * CHUNK + 5
    huge = torch.full((n,), finfo.max, dtype=dtype)
    scattered = sample(n, dtype, spread=False)
    scattered[::1001] = math.nan
    scattered[500::3001] = -math.inf
    both = huge.clone()
    both[CHUNK + 17] = math.inf
    tensors = [huge, scattered, both, *extremes(dtype)]
    _, nonfinite, _ = stats_of(tensors, p, 0, 0, on_native=True)
    _, ref_nonfinite, _ = stats_of(tensors, p, 0, 0, on_native=False)
    expected = [int((~torch.isfinite(t)).sum()) for t in tensors]
    assert nonfinite.tolist() == ref_nonfinite.tolist() == expected
    assert expected[0] == 0 and expected[2] == 1


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
    tensors = [sample(n, dtype, spread=spread) for n in (7 * CHUNK + 11, 5, CHUNK)
               for dtype in FLOAT_DTYPES for spread in (False, True)]
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
    with pytest.raises(RuntimeError, match="permuted-dense"):
        native.cpu_stats([torch.ones(4, 4)[:, ::2]], 2.0, norm_kind(2.0), 0, 0)
    with pytest.raises(RuntimeError, match="permuted-dense"):
        native.cpu_stats([torch.ones(4, 1).expand(4, 3)], 2.0, norm_kind(2.0), 0, 0)
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


@pytest.mark.parametrize("counting", COUNTING)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_histogram_counting_paths_are_exact_at_every_edge(monkeypatch, counting, dtype):
    """Both exponent-counting paths (AVX-512 lanes where the CPU has them, and the scalar
    table) against float64 NumPy: sizes around the vector step, sub-block and chunk, a
    narrow and a wide exponent range per block, and the extremes."""
    monkeypatch.setenv("GRADSTATS_NATIVE_HISTOGRAM", counting)
    tensors = [sample(n, dtype, spread=spread) for n in EDGE_SIZES for spread in (False, True)]
    tensors += extremes(dtype)
    finfo = torch.finfo(dtype)
    lowest = round(math.log2(finfo.smallest_normal)) - mantissa_bits(dtype)
    for num_bins, min_exp in ((64, -30), (1024, lowest - 3), (2, 0)):
        _, nonfinite, hist = stats_of(tensors, 2.0, num_bins, min_exp, on_native=True)
        expected = np.stack([np_histogram(as_float64(t), num_bins, min_exp) for t in tensors])
        np.testing.assert_array_equal(hist.numpy(), expected)
        expected_nonfinite = [int((~torch.isfinite(t)).sum()) for t in tensors]
        assert nonfinite.tolist() == expected_nonfinite


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_histogram_counting_paths_agree_bit_for_bit(monkeypatch, dtype):
    tensors = [sample(n, dtype, spread=True) for n in (5 * CHUNK + 77, 4096, 100)]
    tensors += extremes(dtype)
    results = []
    for counting in COUNTING:
        monkeypatch.setenv("GRADSTATS_NATIVE_HISTOGRAM", counting)
        results.append(stats_of(tensors, 2.0, 64, -40, on_native=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("counting", COUNTING)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_histogram_under_flush_to_zero_on_both_paths(monkeypatch, counting, dtype):
    monkeypatch.setenv("GRADSTATS_NATIVE_HISTOGRAM", counting)
    finfo = torch.finfo(dtype)
    lowest = round(math.log2(finfo.smallest_normal)) - mantissa_bits(dtype)
    tensors = [sample(n, dtype, spread=True) for n in (CHUNK + 3, 65)] + extremes(dtype)
    expected = np.stack([np_histogram(as_float64(t), 64, lowest - 3) for t in tensors])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        _, _, hist = stats_of(tensors, 2.0, 64, lowest - 3, on_native=True)
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(hist.numpy(), expected)


def permuted_dense(dtype: torch.dtype) -> list[torch.Tensor]:
    """Non-contiguous tensors that fill their memory: transposed, channels-last (more than
    a chunk, so chunking order matters), a permuted 3-D view, and a size-1 dimension."""
    return [
        sample(300 * 70, dtype, spread=False).view(70, 300).t(),
        sample(3 * 40 * 30 * 20, dtype, spread=False).view(3, 40, 30, 20).to(
            memory_format=torch.channels_last),
        sample(5 * 7 * CHUNK // 8, dtype, spread=False).view(5, 7, CHUNK // 8).permute(2, 0, 1),
        sample(2 * CHUNK + 3, dtype, spread=False).view(1, -1).t(),
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_permuted_dense_tensors_are_read_in_place(dtype, p):
    tensors = permuted_dense(dtype)
    assert not all(t.is_contiguous() for t in tensors)
    power, nonfinite, hist = stats_of(tensors, p, 64, -40, on_native=True)
    ref_power, ref_nonfinite, ref_hist = stats_of(tensors, p, 64, -40, on_native=False)
    assert_power_close(power, ref_power, dtype, p)
    expected = torch.tensor([np_power(as_float64(t), p) for t in tensors], dtype=torch.float64)
    assert_power_close(power, expected, dtype, p)
    expected_nonfinite = [int((~torch.isfinite(t)).sum()) for t in tensors]
    assert nonfinite.tolist() == ref_nonfinite.tolist() == expected_nonfinite
    np.testing.assert_array_equal(
        hist.numpy(), np.stack([np_histogram(as_float64(t), 64, -40) for t in tensors]))
    assert torch.equal(hist, ref_hist)


def test_permuted_tensor_is_chunked_in_memory_order_like_the_kernels():
    # Four values whose squares overflow float32 together (4e38 > 3.4e38), one alone does
    # not: adjacent in memory (one chunk there, as the kernels read it), a whole chunk apart
    # in logical order. Summed per memory-order chunk in float32, the power is inf.
    base = torch.zeros(CHUNK, 4)
    base[0, :] = 1e19
    transposed = base.t()  # [4, CHUNK]: row j holds base[:, j], so the four are CHUNK apart
    assert torch.linalg.vector_norm(transposed.reshape(-1).view(4, CHUNK), dim=1).isfinite().all()
    power, _, _ = stats_of([transposed], 2.0, 0, 0, on_native=True)
    ref_power, _, _ = stats_of([transposed], 2.0, 0, 0, on_native=False)
    assert math.isinf(power[0]) and math.isinf(ref_power[0])


@pytest.mark.parametrize("num_bins", [0, 64])
def test_grad_stats_sends_only_unreadable_tensors_to_the_reference(monkeypatch, num_bins):
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    permuted = permuted_dense(torch.float32)
    gapped = torch.randn(40, 30)[:, ::3]
    expanded = torch.randn(50, 1).expand(50, 40)  # overlapping: stride 0
    grads = permuted + [gapped, expanded, torch.randn(6, dtype=torch.complex64)]
    sent = []
    fill = dispatch._fill_from_reference
    monkeypatch.setattr(dispatch, "_fill_from_reference",
                        lambda tensors, positions, *args: (sent.extend(positions),
                                                           fill(tensors, positions, *args)))
    stats = gradstats.grad_stats(with_grads(grads), histogram=bool(num_bins), min_exp=-20)
    assert sent == [len(permuted), len(permuted) + 1, len(permuted) + 2]
    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    expected = gradstats.grad_stats(with_grads(grads), histogram=bool(num_bins), min_exp=-20)
    torch.testing.assert_close(stats.norms, expected.norms, rtol=1e-6, atol=0.0)
    real = len(grads) - 1  # all but the complex one
    float64_norms = torch.tensor([float(np.linalg.norm(as_float64(g))) for g in grads[:real]],
                                 dtype=stats.norms.dtype)
    torch.testing.assert_close(stats.norms[:real], float64_norms, rtol=2e-5, atol=0.0)
    assert torch.equal(stats.nonfinite, expected.nonfinite)
    if num_bins:
        assert torch.equal(stats.hist, expected.hist)


@pytest.mark.parametrize("num_bins", [0, 64])
def test_every_vector_width_gives_the_same_bits(monkeypatch, num_bins):
    """The per-element code is compiled for AVX-512F, AVX2 and the baseline x86-64
    (GRADSTATS_NATIVE_ISA picks a narrower one than the CPU's), each with both histogram
    counting paths: every combination gives the same bits, for every norm type and dtype."""
    tensors = [sample(n, dtype, spread=spread) for n in (3 * CHUNK + 7, 4097, 33)
               for dtype in FLOAT_DTYPES for spread in (False, True)]
    for dtype in FLOAT_DTYPES:
        tensors += extremes(dtype)
    for p in NORM_TYPES:
        results = []
        for isa in ("widest", "avx2", "baseline"):
            for counting in COUNTING:
                monkeypatch.setenv("GRADSTATS_NATIVE_ISA", isa)
                monkeypatch.setenv("GRADSTATS_NATIVE_HISTOGRAM", counting)
                results.append(stats_of(tensors, p, num_bins, -40, on_native=True))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("num_bins", [0, 64])
def test_many_small_tensors_split_into_tasks_give_the_same_bits(num_bins):
    """Thousands of small tensors are grouped into tasks by elements, and a tensor of
    several chunks can straddle two tasks (its counts then added from two threads): every
    thread count gives the same bits, and the counts are the reference's."""
    tensors = [sample(n, dtype, spread=n == 17) for n in (256, 17, 4096) * 40
               for dtype in (torch.float32, torch.bfloat16)]
    tensors[5][3] = math.nan
    tensors.insert(50, sample(3 * CHUNK + 5, torch.float32, spread=False))
    tensors[50][CHUNK + 2] = math.inf
    tensors[50][2 * CHUNK + 9] = math.nan
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(stats_of(tensors, 2.0, num_bins, -40, on_native=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)
    power, nonfinite, hist = results[0]
    ref_power, ref_nonfinite, ref_hist = stats_of(tensors, 2.0, num_bins, -40, on_native=False)
    assert torch.equal(nonfinite, ref_nonfinite)
    assert nonfinite[5] == 1 and nonfinite[50] == 2
    assert torch.equal(hist, ref_hist)
    # float32 sums in another order: 4096 terms, each rounding by at most 2^-24
    torch.testing.assert_close(power, ref_power, rtol=1e-5, atol=0.0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_grad_mode_on_with_gradients_that_require_grad(monkeypatch):
    """Gradients from ``backward(create_graph=True)`` require grad. The public entry points
    run under no_grad; the dispatch layer called with grad mode on still returns plain
    results (the C++ op has no autograd formula), equal to those under no_grad."""
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    model(torch.randn(5, 8)).pow(2).sum().backward(create_graph=True)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    assert all(g.requires_grad for g in grads)
    with torch.enable_grad():
        outputs = dispatch.accumulate_stats(grads, 2.0, 64, -40)
    with torch.no_grad():
        expected = dispatch.accumulate_stats(grads, 2.0, 64, -40)
    for got, want in zip(outputs, expected):
        assert not got.requires_grad and got.grad_fn is None
        assert torch.equal(got, want)
    float64_norms = torch.stack([g.detach().double().norm() for g in grads])
    stats = gradstats.grad_stats(params, min_exp=-20)
    total = gradstats.fused_clip_grad_norm_(params, 1e-3)
    assert torch.is_grad_enabled()  # the no_grad of the entry points has ended
    torch.testing.assert_close(stats.norms.double(), float64_norms, rtol=2e-6, atol=0.0)
    torch.testing.assert_close(total.double(), float64_norms.norm(), rtol=2e-6, atol=0.0)
    assert params[0].grad is grads[0] and grads[0].requires_grad  # scaled in place
    for param in params:  # the cycle create_graph made between them
        param.grad = None


def test_route_from_the_host_walk_skips_the_contiguity_scan(monkeypatch):
    """When the native host walk found every gradient contiguous, the dispatch layer reads
    no tensor's contiguity again."""
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    grads = [sample(n, torch.float32, spread=False) for n in (5, 300, CHUNK + 3)]
    params = with_grads(grads)
    expected = gradstats.grad_stats(params, min_exp=-20)
    if not native.host_path_available():
        pytest.skip("the native host path is off")

    def no_scan(tensor, *args, **kwargs):
        raise AssertionError("is_contiguous read in Python")

    monkeypatch.setattr(torch.Tensor, "is_contiguous", no_scan)
    stats = gradstats.grad_stats(params, min_exp=-20)
    monkeypatch.undo()
    assert torch.equal(stats.norms, expected.norms)
    assert torch.equal(stats.hist, expected.hist)
    assert torch.equal(stats.numel, torch.tensor([5, 300, CHUNK + 3]))
