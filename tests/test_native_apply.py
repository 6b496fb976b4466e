"""The native CPU updates (gradstats::cpu_scale_, cpu_clamp_) against torch, bit for bit.

The independent reference is torch itself, one tensor at a time: ``t.mul_(coef)`` (what
torch.nn.utils.clip_grads_with_norm_ does per gradient) and ``t.clamp_(lo, hi)`` /
``torch._foreach_clamp_min_`` + ``_foreach_clamp_max_`` (clip_grad_value_). NaN results
are compared as NaN: torch's own NaN bits differ between its vector body and its tail.
"""
import math

import pytest
import torch
from helpers import FLOAT_DTYPES

import gradstats
from gradstats import dispatch, native, ops

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"{native.unavailable_reason()}")

CHUNK = native.NATIVE_CHUNK
SIZES = [0, 1, 15, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}
COEFS = [0.5, 1 / math.pi, 0.9999999, 1e-3, 2.0 ** -20, 1e-40, 5e-324, 0.0, -0.0, -0.7,
         1.0, 1.5, math.inf, -math.inf, math.nan]
BOUNDS = [(-0.5, 0.5), (-0.1, 0.1), (-0.0, 0.0), (0.0, -0.0), (0.0, 0.0), (2.0, 1.0),
          (-math.inf, math.inf), (-1e-40, 1e-38), (-65504.0, 65504.0), (0.3, 0.3)]


# GRADSTATS_NATIVE_ISA for the updates (csrc/cpu_apply.cpp): the widest intrinsics the CPU
# has (bf16 rounded by AVX512_BF16's conversion where it has one), AVX-512F/BW without
# AVX512_BF16, and no intrinsics (bf16/fp16 then take the auto-vectorised loops of the clone
# the CPU picked). Where the CPU lacks some, the same loops run twice.
ISAS = ["widest", "avx512", "baseline"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("GRADSTATS_NATIVE_ISA", request.param)
    return request.param


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Every non-NaN element bit for bit (so -0.0 is not 0.0), NaN where torch has NaN."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    got_bits, expected_bits = got.view(BITS[got.dtype]), expected.view(BITS[got.dtype])
    mismatch = (got_bits != expected_bits) & ~nan
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} elements differ, e.g. {got[mismatch][:4].tolist()} "
        f"vs torch {expected[mismatch][:4].tolist()}")


def spread(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Values over every binade of ``dtype`` (subnormals included), with zeros of both
    signs, infinities and NaN mixed in."""
    finfo = torch.finfo(dtype)
    low = math.log2(finfo.smallest_normal) - round(-math.log2(finfo.eps)) - 1
    values = torch.randn(n, dtype=torch.float64)
    values *= torch.exp2(torch.empty(n, dtype=torch.float64).uniform_(low, math.log2(finfo.max)))
    values = values.to(dtype)
    for step, special in ((11, 0.0), (13, -0.0), (17, math.inf), (19, -math.inf),
                          (23, math.nan)):
        values[step // 2::step] = special
    return values


def every_16_bit_value(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def torch_scaled(tensor: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """What clip_grads_with_norm_ does to one gradient, except that gradstats leaves the
    gradient alone when the coefficient is >= 1 (torch then multiplies by a clamped 1.0)."""
    out = tensor.clone()
    if not bool(coef >= 1):
        out.mul_(coef)
    return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_scale_matches_torch_bit_for_bit(dtype, coef_dtype, isa):
    tensors = [spread(n, dtype) for n in SIZES]
    for value in COEFS:
        coef = torch.tensor(value, dtype=torch.float64).to(coef_dtype)
        expected = [torch_scaled(t, coef) for t in tensors]
        got = [t.clone() for t in tensors]
        native.cpu_scale_(got, coef)
        for g, e in zip(got, expected):
            assert_same_bits(g, e)


def whole_and_in_tails(tensor: torch.Tensor) -> list[list[torch.Tensor]]:
    """The tensor as one list, and cut into 15-element views: the C++ ops take 16 or 32
    elements per vector step (AVX-512 intrinsics where the CPU has them) and a shorter tail
    through the portable loop, so the two lists run every value through both."""
    return [[tensor], list(tensor.split(15))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scale_and_clamp_every_16_bit_value(dtype, isa):
    values = every_16_bit_value(dtype)
    for value in [0.5, 1 / math.pi, 0.999, 1e-5, 2.0 ** -24, 0.0, -3e-3, math.nan]:
        for coef_dtype in (torch.float32, torch.float64):
            coef = torch.tensor(value, dtype=coef_dtype)
            expected = torch_scaled(values, coef)
            for split in (False, True):
                got = values.clone()
                native.cpu_scale_(whole_and_in_tails(got)[split], coef)
                assert_same_bits(got, expected)
    for lo, hi in BOUNDS:
        expected = values.clone().clamp_(min=lo, max=hi)
        for split in (False, True):
            got = values.clone()
            native.cpu_clamp_(whole_and_in_tails(got)[split], lo, hi)
            assert_same_bits(got, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_clamp_matches_torch_clamp_and_clip_grad_value(dtype, isa):
    tensors = [spread(n, dtype) for n in SIZES]
    # 0.1 and 1/3 round differently from float64 to bf16/fp16 directly and via float32.
    for lo, hi in BOUNDS + [(-1 / 3, 1 / 3), (-0.1000000001, 0.1000000001)]:
        got = [t.clone() for t in tensors]
        native.cpu_clamp_(got, lo, hi)
        for g, t in zip(got, tensors):
            assert_same_bits(g, t.clone().clamp_(min=lo, max=hi))
    value = 0.37
    got = [t.clone() for t in tensors]
    native.cpu_clamp_(got, -value, value)
    expected = [t.clone() for t in tensors]
    torch.nn.utils.clip_grad_value_(gradstats_free_params(expected), value, foreach=True)
    for g, e in zip(got, expected):
        assert_same_bits(g, e)


def gradstats_free_params(grads):
    """Parameters holding ``grads`` as their .grad (for torch.nn.utils' own clipping)."""
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.empty_like(grad))
        param.grad = grad
        params.append(param)
    return params


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_bound_fills_with_nan_as_torch_does(dtype):
    for lo, hi in [(math.nan, 1.0), (-1.0, math.nan)]:
        tensor = spread(100, dtype)
        native.cpu_clamp_([tensor], lo, hi)
        assert_same_bits(tensor, spread(100, dtype).clamp_(min=lo, max=hi))
        assert tensor.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_bound_beyond_the_dtype_is_torchs_error_and_changes_nothing(dtype):
    bound = {torch.float16: 1e5, torch.bfloat16: 1e300, torch.float32: 1e300}[dtype]
    untouched = torch.randn(50, dtype=torch.float64)  # takes any bound
    tensor = torch.randn(50, dtype=dtype)
    before = tensor.clone(), untouched.clone()
    with pytest.raises(RuntimeError) as torch_error:
        tensor.clone().clamp_(min=-bound, max=1.0)
    with pytest.raises(RuntimeError) as native_error:
        native.cpu_clamp_([untouched, tensor], -bound, 1.0)
    assert str(native_error.value).splitlines()[0] == str(torch_error.value).splitlines()[0]
    assert torch.equal(tensor, before[0]) and torch.equal(untouched, before[1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("value", [1.0, 1.5, math.inf])
def test_coef_at_least_one_writes_nothing(dtype, value):
    tensor = spread(CHUNK + 3, dtype)
    bits = tensor.view(BITS[dtype])
    # A signalling NaN (quiet bit clear): any multiply, even by 1.0, would quiet it.
    quiet_bit = {torch.float32: 1 << 22, torch.float64: 1 << 51, torch.bfloat16: 1 << 6,
                 torch.float16: 1 << 9}[dtype]
    signalling = bits[tensor.isnan()]
    bits[tensor.isnan()] = (signalling & ~quiet_bit) | 1
    before = bits.clone()
    native.cpu_scale_([tensor], torch.tensor(value))
    assert torch.equal(tensor.view(BITS[dtype]), before)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_permuted_dense_tensors(dtype):
    tensors = [spread(64 * 33, dtype).view(64, 33).t(),
               spread(2 * 3 * 5 * 7, dtype).view(2, 3, 5, 7).permute(0, 2, 3, 1),
               spread(CHUNK + 9, dtype).view(1, CHUNK + 9, 1).transpose(0, 2)]
    coef = torch.tensor(0.3)
    got = [t.clone(memory_format=torch.preserve_format) for t in tensors]
    assert not got[0].is_contiguous() and not got[1].is_contiguous()
    native.cpu_scale_(got, coef)
    for g, t in zip(got, tensors):
        assert_same_bits(g, torch_scaled(t, coef))
    native.cpu_clamp_(got, -0.01, 0.02)
    for g, t in zip(got, tensors):
        assert_same_bits(g, torch_scaled(t, coef).clamp_(-0.01, 0.02))


def test_many_tensors_of_every_dtype_and_size():
    sizes = torch.randint(0, 3000, (4500,)).tolist()
    tensors = [spread(n, FLOAT_DTYPES[i % 4]) for i, n in enumerate(sizes)]
    coef = torch.tensor(0.61)
    got = [t.clone() for t in tensors]
    native.cpu_scale_(got, coef)
    for g, t in zip(got, tensors):
        assert_same_bits(g, torch_scaled(t, coef))


def test_view_listed_twice_is_updated_once_overlapping_views_each_once():
    tensor = torch.randn(100)
    buffer = torch.randn(100)
    expected_tensor, expected_buffer = tensor.clone(), buffer.clone()
    expected_tensor.mul_(0.5)
    expected_buffer[:60].mul_(0.5)  # torch's loop: the shared elements are scaled twice
    expected_buffer[40:].mul_(0.5)
    expected_buffer.view(10, 10).t().mul_(0.5)  # the same memory, another view: once more
    native.cpu_scale_([tensor, buffer[:60], tensor, buffer[40:], tensor.view(100),
                       buffer.view(10, 10).t()], torch.tensor(0.5))
    assert torch.equal(buffer, expected_buffer)
    # tensor.view(100): same address, sizes and strides as tensor, so the same view.
    assert torch.equal(tensor, expected_tensor)


def test_rejects_what_it_cannot_read_before_changing_anything():
    good = torch.randn(10)
    before = good.clone()
    coef = torch.tensor(0.5)
    for bad, message in [
        (torch.randn(10, 4)[:, ::2], "dense"),
        (torch.ones(3, dtype=torch.int32), "float32/float64/bfloat16/float16"),
        (torch.randn(3, dtype=torch.complex64), "float32/float64/bfloat16/float16"),
        (torch.randn(4).to_sparse(), "SparseCPU"),  # the dispatcher finds no kernel
        (torch.frombuffer(bytearray(44), dtype=torch.float32, offset=1, count=10),
         "element-aligned"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            native.cpu_scale_([good, bad], coef)
        with pytest.raises(RuntimeError, match=message):
            native.cpu_clamp_([good, bad], -0.1, 0.1)
    with pytest.raises(RuntimeError, match="one-element"):
        native.cpu_scale_([good], torch.tensor([0.5, 0.5]))
    with pytest.raises(RuntimeError, match="floating-point coefficient"):
        native.cpu_scale_([good], torch.tensor(0))
    assert torch.equal(good, before)


def test_opcheck():
    tensors = [torch.randn(n) for n in (3, 700, 0, 1)] + [
        torch.randn(40, dtype=torch.bfloat16), torch.randn(9, 4, dtype=torch.float16).t(),
        torch.randn(5, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.gradstats.cpu_scale_.default,
                          ([t.clone() for t in tensors], torch.tensor(0.5)))
    torch.library.opcheck(torch.ops.gradstats.cpu_scale_.default,
                          ([t.clone() for t in tensors], torch.tensor(1.0, dtype=torch.float64)))
    torch.library.opcheck(torch.ops.gradstats.cpu_clamp_.default,
                          ([t.clone() for t in tensors], -0.5, 0.5))


def test_dispatch_sends_what_cpp_reads_to_it_and_the_rest_to_the_reference(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    tensors = [torch.randn(30), torch.randn(8, 6)[:, ::2], torch.randn(5).to_sparse(),
               torch.randn(4, dtype=torch.complex64), torch.randn(7, 3).t(),
               torch.randn(12, dtype=torch.bfloat16)]
    seen = []  # the lists the C++ ops updated (a refused list raises before any change)

    def spy(real):
        def update(ts, *args):
            real(ts, *args)
            seen.append(ts)
        return update
    monkeypatch.setattr(native, "cpu_scale_", spy(native.cpu_scale_))
    monkeypatch.setattr(native, "cpu_clamp_", spy(native.cpu_clamp_))
    coef = torch.tensor(0.25)
    expected = [t.clone().mul_(coef) for t in tensors]
    dispatch.scale_(tensors, coef)
    for got, want in zip(tensors, expected):
        assert torch.equal(got.to_dense(), want.to_dense())
    clampable = [t for t in tensors if not t.is_complex() and not t.is_sparse]  # torch's
    expected = [t.clone().clamp_(-0.05, 0.05) for t in clampable]
    dispatch.clamp_(clampable, -0.05, 0.05)
    for got, want in zip(clampable, expected):
        assert torch.equal(got, want)
    # In list order: runs of readable tensors to C++, the others to the reference.
    runs = [[id(tensors[0])], [id(tensors[4]), id(tensors[5])]]
    assert [[id(t) for t in call] for call in seen] == runs + runs


def test_a_partly_readable_list_is_updated_in_list_order_as_torchs_loop(monkeypatch):
    """Overlapping views of one buffer in two dtypes, one the C++ op cannot read (strided
    with gaps) before one it can: updated in list order, each result as torch's loop."""
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    buffer = torch.randn(64)
    twin = buffer.clone()
    coef = torch.tensor(0.3)
    dispatch.scale_([buffer.view(torch.bfloat16)[::2], buffer], coef)
    for view in (twin.view(torch.bfloat16)[::2], twin):
        view.mul_(coef)
    assert_same_bits(buffer, twin)


def test_an_inference_gradient_is_refused_before_anything_is_scaled(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    param = torch.nn.Parameter(torch.zeros(4))
    with torch.inference_mode():
        param.grad = torch.full((4,), 3.0)
    with pytest.raises(RuntimeError, match="inference"):
        gradstats.clip_grads_with_norm_([param], max_norm=1.0, total_norm=torch.tensor(6.0))
    assert torch.equal(param.grad, torch.full((4,), 3.0))
    with pytest.raises(RuntimeError, match="inference tensor"):
        native.cpu_scale_([param.grad], torch.tensor(0.5))
    gapped = torch.nn.Parameter(torch.zeros(4))
    gapped.grad = torch.full((4, 2), 3.0)[:, 0]  # read by the reference, in its own run
    with pytest.raises(RuntimeError, match="inference tensor"):
        gradstats.clip_grads_with_norm_([gapped, param], max_norm=1.0,
                                        total_norm=torch.tensor(6.0))
    assert torch.equal(gapped.grad, torch.full((4,), 3.0))
    with torch.inference_mode():  # where torch allows the update, so does the op
        native.cpu_scale_([param.grad], torch.tensor(0.5))
    assert torch.equal(param.grad, torch.full((4,), 1.5))


def test_no_clipping_needed_reads_no_tensor_in_python(monkeypatch):
    """coef >= 1: dispatch returns before splitting the list (no per-tensor Python)."""
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    monkeypatch.setattr(dispatch, "_update_in_runs", lambda *args: pytest.fail("split"))
    tensors = [torch.randn(10)]
    before = tensors[0].clone()
    dispatch.scale_(tensors, torch.tensor(1.0))
    assert torch.equal(tensors[0], before)


@pytest.mark.parametrize("op", ["accumulate_stats", "finalize", "scale_", "clamp_"])
def test_cpu_call_of_each_op_takes_the_cpu_kernel(op, monkeypatch, backend_device):
    """The dispatcher sends CPU tensors to the kernel registered for "cpu"; on the native
    backend the updates then reach the C++ ops."""
    routes = []
    real_route = ops._cpu_route
    monkeypatch.setattr(ops, "_cpu_route", lambda ts: routes.append(1) or real_route(ts))
    calls = []
    # cpu_stats_direct is the statistics op's kernel called beside the dispatcher (counted
    # as cpu_stats; it declines, and the op runs, only for what the dispatcher treats
    # differently).
    for name in ("cpu_scale_", "cpu_clamp_", "cpu_stats", "cpu_stats_direct"):
        real = getattr(native, name)
        seen = name.removesuffix("_direct")
        monkeypatch.setattr(native, name,
                            lambda *args, real=real, seen=seen: calls.append(seen) or real(*args))
    tensors = [torch.randn(50), torch.randn(7, dtype=torch.bfloat16)]
    if op == "accumulate_stats":
        torch.ops.gradstats.accumulate_stats(tensors, 2.0, 8, -10)
    elif op == "finalize":
        torch.ops.gradstats.finalize(torch.rand(3, dtype=torch.float64), 2.0, 1.0,
                                     torch.float32)
    elif op == "scale_":
        torch.ops.gradstats.scale_(tensors, torch.tensor(0.5))
    else:
        torch.ops.gradstats.clamp_(tensors, -0.1, 0.1)
    if op != "finalize":
        assert routes == [1]
    on_native = gradstats.backend.choose_backend(torch.device("cpu")).value == "native"
    expected = {"accumulate_stats": ["cpu_stats"], "finalize": [], "scale_": ["cpu_scale_"],
                "clamp_": ["cpu_clamp_"]}[op]
    assert calls == (expected if on_native else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_op_call_with_cpu_and_cuda_tensors_updates_both():
    tensors = [torch.randn(100), torch.randn(100, device="cuda"), torch.randn(9)]
    coef = torch.tensor(0.5, device="cuda")
    expected = [t.clone().mul_(coef.to(t.device)) for t in tensors]
    torch.ops.gradstats.scale_(tensors, coef)
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want)
    expected = [t.clone().clamp_(-0.2, 0.2) for t in tensors]
    torch.ops.gradstats.clamp_(tensors, -0.2, 0.2)
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want)


def test_dispatch_clamp_bound_beyond_fp16_is_torchs_error_and_changes_nothing(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    tensors = [torch.randn(10), torch.randn(10, dtype=torch.float16)]
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match="c10::Half without overflow"):
        dispatch.clamp_(tensors, -1e10, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


def test_updates_bump_the_version_counter_as_torch_does_and_no_work_does_not():
    """Autograd checks saved tensors against their version: an in-place update must bump it
    (torch's mul_/clamp_ do); the coefficient >= 1 path writes nothing and leaves it."""
    tensors = [torch.randn(20), torch.randn(3, 4, dtype=torch.bfloat16)]
    versions = [t._version for t in tensors]
    native.cpu_scale_(tensors, torch.tensor(1.0))
    assert [t._version for t in tensors] == versions
    native.cpu_scale_(tensors, torch.tensor(0.5))
    native.cpu_clamp_(tensors, -0.1, 0.1)
    native.cpu_clamp_(tensors, math.nan, 0.1)
    assert all(t._version == v + 3 for t, v in zip(tensors, versions))
