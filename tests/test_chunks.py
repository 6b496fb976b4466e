"""How the kernels split a chunk (``gradstats/kernels/chunks.py``): a head before the first
16-byte boundary, full blocks, whole vectors, and a remainder. Gradients here sit at several
element offsets from a 16-byte boundary and have every length modulo the vector width, in
one dtype group, so each part is read (and written) with and without the others.
"""
import math

import numpy as np
import pytest
import torch
from helpers import (
    FLOAT_DTYPES,
    as_float64,
    norm_rtol,
    np_histogram,
    np_norm,
    np_total_norm,
    torch_rtol,
    with_grads,
)

import gradstats
from gradstats import launch_config as config
from gradstats.kernels.chunks import launch_vector_width, vector_width

# Around the tiny test block (64) and chunk (256); 1 to 17 covers every length modulo the
# widest vector (8 bf16/fp16 elements) twice.
TAIL_SIZES = list(range(1, 18)) + [63, 64, 65, 255, 257, 3 * 256 + 5]


def some_offsets(dtype):
    """Element offsets from a 16-byte boundary: aligned, and heads of 1, half and all but
    one of a vector (every offset would make a slow interpreter run)."""
    width = vector_width(dtype)
    return sorted({0, 1, width // 2, width - 1})


def views_at_offsets(sizes, offsets, dtype, device, gap=3):
    """(flat buffer, views): one view per (size, element offset from a 16-byte boundary),
    ``gap`` elements apart, so a write outside a view shows in the buffer."""
    starts, position = [], 0
    for size in sizes:
        for offset in offsets:
            position = -(-position // 16) * 16 + offset  # 16 elements: a 16-byte boundary
            starts.append((position, size))
            position += size + gap
    flat = torch.randn(position + 16, dtype=torch.float64).to(dtype).to(device)
    return flat, [flat[start:start + size] for start, size in starts]


def check_against_float64(stats, grads, p, device):
    arrays = [as_float64(g) for g in grads]
    rtol = norm_rtol(grads[0].dtype, p, device)
    expected = torch.tensor([np_norm(a, p) for a in arrays], dtype=torch.float64)
    torch.testing.assert_close(stats.norms.cpu().double(), expected, rtol=rtol, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(stats.total_norm.cpu().double(),
                               torch.tensor(np_total_norm(arrays, p), dtype=torch.float64),
                               rtol=rtol, atol=0, equal_nan=True)
    assert stats.nonfinite.tolist() == [int(np.sum(~np.isfinite(a))) for a in arrays]
    expected_hist = np.stack([np_histogram(a, 64, -40) for a in arrays])
    np.testing.assert_array_equal(stats.hist.cpu().numpy(), expected_hist)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_tail_length_at_each_offset_matches_float64(backend_device, small_chunks, dtype):
    offsets = some_offsets(dtype)
    flat, grads = views_at_offsets(TAIL_SIZES, offsets, dtype, backend_device)
    grads[5][-1] = float("nan")  # in a remainder
    grads[40][0] = -float("inf")  # in a head
    assert {g.data_ptr() % 16 for g in grads} == {o * dtype.itemsize for o in offsets}
    for p in (2.0, math.inf):
        check_against_float64(gradstats.grad_stats(with_grads(grads), p), grads, p,
                              backend_device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_unaligned_gradient_among_aligned_ones(backend_device, small_chunks, dtype):
    grads = [torch.randn(n, dtype=torch.float64).to(dtype).to(backend_device)
             for n in (300, 64, 17, 1000)]
    flat = torch.randn(600, dtype=torch.float64).to(dtype).to(backend_device)
    grads.insert(2, flat[1:1 + 517])  # a view one element off: a DDP bucket, a flat buffer
    assert [g.data_ptr() % 16 == 0 for g in grads] == [True, True, False, True, True]
    check_against_float64(gradstats.grad_stats(with_grads(grads)), grads, 2.0, backend_device)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_at_each_offset_matches_torch_and_writes_only_inside(backend_device, small_chunks,
                                                                   dtype):
    flat, grads = views_at_offsets(TAIL_SIZES, some_offsets(dtype), dtype, backend_device)
    expected_flat = flat.clone()
    expected_grads = [expected_flat[g.storage_offset():g.storage_offset() + g.numel()]
                      for g in grads]
    total = gradstats.clip_grad_norm_(with_grads(grads), 0.1)
    expected_total = torch.nn.utils.clip_grad_norm_(with_grads(expected_grads), 0.1)
    rtol = torch_rtol(dtype)
    torch.testing.assert_close(total, expected_total, rtol=rtol, atol=0, equal_nan=True)
    # Views hold the scaled values; the gaps between them are untouched.
    torch.testing.assert_close(flat, expected_flat, rtol=rtol, atol=1e-7)
    inside = torch.zeros(flat.numel(), dtype=torch.bool)
    for g in grads:
        inside[g.storage_offset():g.storage_offset() + g.numel()] = True
    assert torch.equal(flat[~inside.to(flat.device)], expected_flat[~inside.to(flat.device)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_clip_grad_value_at_each_offset_matches_torch(backend_device, small_chunks, dtype):
    flat, grads = views_at_offsets(TAIL_SIZES, some_offsets(dtype), dtype, backend_device)
    expected_flat = flat.clone()
    expected_grads = [expected_flat[g.storage_offset():g.storage_offset() + g.numel()]
                      for g in grads]
    gradstats.clip_grad_value_(with_grads(grads), 0.5)
    torch.nn.utils.clip_grad_value_(with_grads(expected_grads), 0.5)
    assert torch.equal(flat, expected_flat)


# Bit patterns at the edges of finite: NaNs (quiet, signalling, negative), infinities, the
# largest finite values and the smallest subnormals and normals, both signs.
_SPECIAL_BITS = {
    torch.float32: (torch.int32, [0x7FC00000, 0x7F800001, -0x00400000, 0x7F800000, -0x00800000,
                                  0x7F7FFFFF, -0x00800001, 0x00000001, -0x7FFFFFFF, 0x00800000,
                                  0x007FFFFF, 0, -0x80000000]),
    torch.bfloat16: (torch.int16, [0x7FC0, 0x7F81, -0x0040, 0x7F80, -0x0080, 0x7F7F, -0x0081,
                                   0x0001, -0x7FFF, 0x0080, 0x007F, 0, -0x8000]),
    torch.float16: (torch.int16, [0x7E00, 0x7C01, -0x0200, 0x7C00, -0x0400, 0x7BFF, -0x0401,
                                  0x0001, -0x7FFF, 0x0400, 0x03FF, 0, -0x8000]),
    torch.float64: (torch.int64, [0x7FF8000000000000, 0x7FF0000000000001, -0x0008000000000000,
                                  0x7FF0000000000000, -0x0010000000000000, 0x7FEFFFFFFFFFFFFF,
                                  -0x0010000000000001, 1, -0x7FFFFFFFFFFFFFFF,
                                  0x0010000000000000, 0x000FFFFFFFFFFFFF, 0,
                                  -0x8000000000000000]),
}
_SPECIAL_NONFINITE = 5  # the first five patterns


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_count_exact_at_the_edges_of_finite(backend_device, small_chunks, dtype):
    int_dtype, bits = _SPECIAL_BITS[dtype]
    specials = torch.tensor(bits, dtype=int_dtype).view(dtype)
    assert int(np.sum(~np.isfinite(as_float64(specials)))) == _SPECIAL_NONFINITE
    # The patterns land in heads, full blocks, whole vectors and remainders.
    flat, grads = views_at_offsets([13, 64, 100, 300], [0, 1], dtype, backend_device)
    for g in grads:
        for start in range(0, g.numel(), 37):
            g[start:start + len(bits)] = specials[:g.numel() - start].to(g.device)
    stats = gradstats.grad_stats(with_grads(grads))
    expected = [int(np.sum(~np.isfinite(as_float64(g)))) for g in grads]
    assert min(expected) >= 1
    assert stats.nonfinite.tolist() == expected
    finite = [as_float64(g)[np.isfinite(as_float64(g))] for g in grads]
    expected_hist = np.stack([np_histogram(a, 64, -40) for a in finite])
    np.testing.assert_array_equal(stats.hist.cpu().numpy(), expected_hist)


def test_every_launch_config_suits_the_kernels():
    configs = [(dtype, config.GPU_CONFIGS[dtype]) for dtype in config.GPU_CONFIGS]
    configs += [(dtype, config.INTERPRETER_CONFIG) for dtype in FLOAT_DTYPES]
    for dtype, launch in configs:
        assert launch_vector_width(dtype, launch.chunk, launch.block) == vector_width(dtype)


@pytest.mark.parametrize("chunk,block", [(256, 8), (100, 64), (64, 128)])
def test_launch_sizes_the_kernels_cannot_use_are_refused(chunk, block):
    # bf16: 8 elements a vector, so a block needs 16 (head and remainder share one).
    with pytest.raises(ValueError, match="multiples"):
        launch_vector_width(torch.bfloat16, chunk, block)


def test_memory_starting_between_two_elements_takes_the_reference_path(backend_device):
    # torch's allocator never does this, but frombuffer and DLPack can: an fp32 gradient at
    # an address 13 bytes past a 16-byte boundary. The kernels step in whole elements from
    # the first 16-byte boundary, so such a tensor must not reach them.
    raw = bytearray(4 * 300 + 32)
    start = (-np.frombuffer(raw, dtype=np.uint8).ctypes.data + 13) % 16
    grad = torch.frombuffer(raw, dtype=torch.float32, count=256, offset=start)
    assert grad.data_ptr() % 16 == 13
    grad.copy_(torch.arange(256, dtype=torch.float32) - 100)
    expected = torch.linalg.vector_norm(grad.double())
    params = with_grads([grad])
    stats = gradstats.grad_stats(params, histogram=True)
    assert stats.total_norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats.hist.sum().item() == 256
    gradstats.clip_grad_value_(params, 100.0)
    assert grad.max().item() == 100.0 and grad.min().item() == -100.0


def test_rocm_builds_never_get_the_ptx_histogram(monkeypatch):
    from gradstats.kernels import stats as stats_kernels
    cuda = torch.device("cuda")
    gpu = config.GPU_CONFIGS[torch.float32]
    assert stats_kernels._shared_counter_sets(cuda, gpu, 64) == 32
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert stats_kernels._shared_counter_sets(cuda, gpu, 64) == 0
