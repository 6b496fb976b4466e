"""The fused statistics pass: every gradient read once, all statistics at once.

``_stats_kernel``: one program per work item (a chunk of one tensor). It reads the chunk,
  accumulates the norm power (``sum |x|^p`` or ``max |x|``), the non-finite count and,
  when ``HISTOGRAM``, the log2-magnitude histogram, and writes one partial power and one
  partial count into the item's own slot (no float atomics: results are bit-identical run
  to run). Histogram counts are integers, so they go straight to the tensor's row with
  integer atomics, which are exact in any order. On GPUs a program counts its histogram
  in shared-memory counters, one set per lane of a warp (see ``_counters_open``); in the
  interpreter with tl.histogram.
``_reduce_chunks_kernel``: one program per tensor; sums its chunk partials in a fixed
  order (in float64) and fixes the two histogram columns the main loop left approximate.

Per element the main loop does only the arithmetic each output needs: the power, a
carry test on the exponent bits for non-finite values (``_nonfinite_flag``), and the bin
index from the exponent bits. Zeros, padding lanes and non-finite values are not masked
out of the histogram; they land in known columns that the reduce kernel corrects once per
tensor from counts it already has (column 0 := numel - non-finite - all other columns).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch_config import LaunchConfig
from ..norms import NormKind
from ..worklist import WorkList
from .chunks import _edges, _vector_end, _work_item, launch_vector_width

_INF: tl.constexpr = tl.constexpr(NormKind.INF.value)
_L1: tl.constexpr = tl.constexpr(NormKind.L1.value)
_L2: tl.constexpr = tl.constexpr(NormKind.L2.value)

# IEEE layouts: (exponent shift, exponent bias, the exponent all-ones bits stand for).
FP32_LAYOUT = (23, 127, 128)
FP64_LAYOUT = (52, 1023, 1024)
# Scaling a subnormal by 2^64 makes it normal without rounding (for fp32 and fp64), so its
# exponent can be read from the bits; only needed when the histogram range reaches below
# the smallest normal exponent.
_SUBNORMAL_SHIFT: tl.constexpr = tl.constexpr(64)
_SUBNORMAL_SCALE: tl.constexpr = tl.constexpr(2.0**64)
REDUCE_BLOCK = 1024
# Passed to every launch: fused multiply-adds (one rounding, one instruction per element for
# the 2-norm), whatever Triton's default, which 3.10 changes (3.9 warns about it).
ENABLE_FP_FUSION = True
# The histogram constexprs passed when the histogram is off: the kernels ignore them, and
# fixed values keep every call without a histogram (clip_grad_norm_'s min_exp=0, a
# grad_stats(histogram=False) with the user's min_exp) on one compiled kernel.
_NO_HISTOGRAM = dict(NUM_BINS=1, HIST_BINS=2, MIN_EXP=0)


@triton.jit
def _nan_max(a, b):
    # tl.max and the default tl.maximum drop NaN; torch's inf-norm propagates it.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nonfinite_flag(xf):
    """1 where ``xf`` (fp32 or fp64) is NaN or +-Inf, else 0, as int32.

    Read from the word holding the sign and exponent (the high one of an fp64): with the
    sign cleared, adding one to the exponent field carries into bit 31 exactly when the
    field is all ones. That is three integer instructions per element, the last one
    (shift and add) landing in the count: a float compare gives a predicate instead, and
    ptxas adds a predicate to the count with a select plus a register move per element.
    """
    if xf.dtype == tl.float64:
        word = (xf.to(tl.uint64, bitcast=True) >> 32).to(tl.uint32)
        return (((word & 0x7FFFFFFF) + 0x100000) >> 31).to(tl.int32)
    else:
        word = xf.to(tl.uint32, bitcast=True)
        return (((word & 0x7FFFFFFF) + 0x800000) >> 31).to(tl.int32)


@triton.jit
def _accumulate_block(
    x, power, nonfinite, hist, p,
    ACC_DTYPE: tl.constexpr, NORM_KIND: tl.constexpr, HISTOGRAM: tl.constexpr,
    NUM_BINS: tl.constexpr, HIST_BINS: tl.constexpr, MIN_EXP: tl.constexpr,
    EXP_SHIFT: tl.constexpr, EXP_BIAS: tl.constexpr, EXACT_SUBNORMALS: tl.constexpr,
    COUNTER_SETS: tl.constexpr,
):
    xf = x.to(ACC_DTYPE)
    ax = tl.abs(xf)
    if NORM_KIND == _INF:
        power = _nan_max(power, ax)
    elif NORM_KIND == _L1:
        power += ax
    elif NORM_KIND == _L2:
        power += xf * xf
    else:
        power += tl.exp2(tl.log2(ax) * p)  # |x|^p; 0 -> exp2(-inf) = 0
    nonfinite += _nonfinite_flag(xf)
    if ACC_DTYPE == tl.float64:
        bits = ax.to(tl.int64, bitcast=True)
    elif x.dtype == tl.bfloat16:
        # bf16 is the top half of an fp32: widen the bits, not the value. Same result on
        # GPUs, and exact in the interpreter, which flushes bf16 subnormals when converting.
        bits = ((x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF) << 16)
        ax = bits.to(tl.float32, bitcast=True)
    else:
        bits = ax.to(tl.int32, bitcast=True)
    biased = bits >> EXP_SHIFT
    if HISTOGRAM:
        # column k >= 1 holds floor(log2|x|) == MIN_EXP + k - 1; clamp out-of-range values
        # ourselves (tl.histogram drops or wraps them depending on version and backend).
        if EXACT_SUBNORMALS:
            scaled = (ax * _SUBNORMAL_SCALE).to(bits.dtype, bitcast=True)
            biased = tl.where(biased == 0, (scaled >> EXP_SHIFT) - _SUBNORMAL_SHIFT, biased)
            column = biased - (EXP_BIAS + MIN_EXP - 1)
            column = tl.minimum(tl.maximum(column, 1), NUM_BINS - 1)
            column = tl.where(bits == 0, 0, column)
        else:
            # A zero's column, -(EXP_BIAS + MIN_EXP - 1), is <= 0 here, and the bits of
            # min(|x|, smallest subnormal) are 0 for a zero and 1 otherwise: the lower clamp
            # sends zeros to column 0 and the rest to columns >= 1 without a compare and
            # select (one float min, which keeps subnormals: no flush-to-zero).
            tiniest = tl.full([], 1, bits.dtype).to(ax.dtype, bitcast=True)
            nonzero = tl.minimum(ax, tiniest).to(bits.dtype, bitcast=True)
            column = tl.maximum(biased - (EXP_BIAS + MIN_EXP - 1), nonzero)
            column = tl.minimum(column, NUM_BINS - 1)
        column = column.to(tl.int32)
        if COUNTER_SETS > 0:
            # hist is this thread's set of counters in shared memory (_counters_open).
            _counter_increment(hist + column * (COUNTER_SETS * 4))
        else:
            hist += tl.histogram(column, HIST_BINS)
    return power, nonfinite, hist


# Shared-memory counters for the histogram on GPUs (COUNTER_SETS > 0). tl.histogram's
# lowering depends on the triton version: 3.6 ballots log2(bins) times per element and
# pops counts per lane (51 SASS/element for 64 fp32 bins, above the issue budget at
# memory speed); 3.9 adds every element atomically into one histogram shared by the
# whole block, so the lanes of a warp that share a bin serialise. Here each lane of a
# warp adds into its own set of counters (the warps share them: atomics keep that exact),
# laid out [bin][set] so a warp's 32 lanes always hit 32 different words in 32 different
# banks: one shared atomic per element, no collision within an instruction, the same
# code on every version. The sets are summed once per program. This is PTX through
# inline asm, which the interpreter cannot run: there, tl.histogram counts (same columns).
_COUNTER_WORDS: tl.constexpr = tl.constexpr(8192)  # at most 32 KB of static shared memory


def _counters_declaration(words: int) -> str:
    return (f".shared .align 16 .b32 gradstats_hist_counters[{words}];\n\t"
            "mov.u32 $0, gradstats_hist_counters;")


# The array is declared no larger than the bins need (64 bins x 32 sets: 8 KB), so that
# GPUs with 100 KB of shared memory per SM (sm_86/89) still fit several programs per SM.
_COUNTERS_1K: tl.constexpr = tl.constexpr(_counters_declaration(1024))
_COUNTERS_2K: tl.constexpr = tl.constexpr(_counters_declaration(2048))
_COUNTERS_4K: tl.constexpr = tl.constexpr(_counters_declaration(4096))
_COUNTERS_8K: tl.constexpr = tl.constexpr(_counters_declaration(8192))


@triton.jit
def _shared_asm(asm: tl.constexpr, address, pure: tl.constexpr = False):
    return tl.inline_asm_elementwise(asm, "=r,r", [address], dtype=tl.int32, is_pure=pure,
                                     pack=1)


@triton.jit
def _counter_increment(address):
    _shared_asm("red.shared.add.u32 [$1], 1;\n\tmov.u32 $0, 0;", address)


@triton.jit
def _barrier():
    _shared_asm("bar.sync 0;\n\tmov.u32 $0, $1;", tl.program_id(0))


@triton.jit
def _counters_open(HIST_BINS: tl.constexpr, COUNTER_SETS: tl.constexpr):
    """Zero the counters; return this thread's set (the address of its bin 0)."""
    tl.static_assert(HIST_BINS * COUNTER_SETS <= _COUNTER_WORDS)
    # One declaration per program, picked at compile time (the asm must be a constant).
    if HIST_BINS * COUNTER_SETS <= 1024:
        base = _shared_asm(_COUNTERS_1K, tl.program_id(0))
    elif HIST_BINS * COUNTER_SETS <= 2048:
        base = _shared_asm(_COUNTERS_2K, tl.program_id(0))
    elif HIST_BINS * COUNTER_SETS <= 4096:
        base = _shared_asm(_COUNTERS_4K, tl.program_id(0))
    else:
        base = _shared_asm(_COUNTERS_8K, tl.program_id(0))
    words = tl.arange(0, HIST_BINS * COUNTER_SETS)
    _shared_asm("st.shared.u32 [$1], 0;\n\tmov.u32 $0, 0;", base + words * 4)
    _barrier()
    thread = _shared_asm("mov.u32 $0, %tid.x;", tl.program_id(0), pure=True)
    return base + (thread % COUNTER_SETS) * 4


@triton.jit
def _counters_close(counters, HIST_BINS: tl.constexpr, COUNTER_SETS: tl.constexpr):
    """Sum the sets: the block's histogram."""
    _barrier()
    thread = _shared_asm("mov.u32 $0, %tid.x;", tl.program_id(0), pure=True)
    base = counters - (thread % COUNTER_SETS) * 4
    words = (tl.arange(0, HIST_BINS)[:, None] * COUNTER_SETS
             + tl.arange(0, COUNTER_SETS)[None, :])
    return tl.sum(_shared_asm("ld.shared.u32 $0, [$1];", base + words * 4), 1)


@triton.jit
def _stats_kernel(
    ptrs_ptr, numels_ptr, slots_ptr, work_tensor_ptr, work_chunk_ptr,
    partial_power_ptr, partial_nonfinite_ptr, hist_ptr, p,
    DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, NORM_KIND: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
    HISTOGRAM: tl.constexpr, NUM_BINS: tl.constexpr, HIST_BINS: tl.constexpr,
    MIN_EXP: tl.constexpr, EXP_SHIFT: tl.constexpr, EXP_BIAS: tl.constexpr,
    EXACT_SUBNORMALS: tl.constexpr, COUNTER_SETS: tl.constexpr,
):
    work = tl.program_id(0)  # also this program's slot for its partials
    tensor, chunk, body, length, head = _work_item(
        ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr, DTYPE, CHUNK, VEC)
    lanes = tl.arange(0, BLOCK)

    power = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
    if COUNTER_SETS > 0:
        hist = _counters_open(HIST_BINS, COUNTER_SETS)
    else:
        hist = tl.zeros([HIST_BINS], dtype=tl.int32)
    body_length = length - head
    vector_end = _vector_end(body_length, VEC)
    full = (body_length // BLOCK) * BLOCK
    # Masked-off lanes read 0: no power, not non-finite, histogram column 0 (fixed later).
    if (head > 0) | (vector_end < body_length):  # elements off the 16-byte grid: scalar loads
        offsets, in_edges = _edges(lanes, head, vector_end, length, VEC)
        x = tl.load(chunk + offsets, mask=in_edges, other=0.0)
        power, nonfinite, hist = _accumulate_block(
            x, power, nonfinite, hist, p, ACC_DTYPE, NORM_KIND, HISTOGRAM,
            NUM_BINS, HIST_BINS, MIN_EXP, EXP_SHIFT, EXP_BIAS, EXACT_SUBNORMALS,
            COUNTER_SETS)
    # The rest with 128-bit loads (chunks.py): full blocks without a mask, then the tail's
    # whole vectors.
    for offset in range(0, full, BLOCK):
        x = tl.load(body + offset + lanes)
        power, nonfinite, hist = _accumulate_block(
            x, power, nonfinite, hist, p, ACC_DTYPE, NORM_KIND, HISTOGRAM,
            NUM_BINS, HIST_BINS, MIN_EXP, EXP_SHIFT, EXP_BIAS, EXACT_SUBNORMALS,
            COUNTER_SETS)
    if full < vector_end:
        offsets = full + lanes
        x = tl.load(body + offsets, mask=offsets < vector_end, other=0.0)
        power, nonfinite, hist = _accumulate_block(
            x, power, nonfinite, hist, p, ACC_DTYPE, NORM_KIND, HISTOGRAM,
            NUM_BINS, HIST_BINS, MIN_EXP, EXP_SHIFT, EXP_BIAS, EXACT_SUBNORMALS,
            COUNTER_SETS)

    if NORM_KIND == _INF:
        tl.store(partial_power_ptr + work, tl.reduce(power, 0, _nan_max))
    else:
        tl.store(partial_power_ptr + work, tl.sum(power, 0))
    tl.store(partial_nonfinite_ptr + work, tl.sum(nonfinite, 0))
    if HISTOGRAM:
        if COUNTER_SETS > 0:
            hist = _counters_close(hist, HIST_BINS, COUNTER_SETS)
        columns = tl.arange(0, HIST_BINS)
        row = hist_ptr + tl.load(slots_ptr + tensor) * NUM_BINS
        # Relaxed: the counts are only read by the reduce kernel, after this launch ends,
        # and the old value returned is unused, so no ordering is needed (red, not atom).
        tl.atomic_add(row + columns, hist.to(tl.int64), mask=(columns < NUM_BINS) & (hist != 0),
                      sem="relaxed")


@triton.jit
def _reduce_chunks_kernel(
    numels_ptr, slots_ptr, first_work_ptr, partial_power_ptr, partial_nonfinite_ptr,
    power_ptr, nonfinite_ptr, hist_ptr,
    NORM_KIND: tl.constexpr, BLOCK: tl.constexpr, HISTOGRAM: tl.constexpr,
    NUM_BINS: tl.constexpr, HIST_BINS: tl.constexpr, NONFINITE_COLUMN: tl.constexpr,
):
    tensor = tl.program_id(0)
    slot = tl.load(slots_ptr + tensor)
    first = tl.load(first_work_ptr + tensor)
    last = tl.load(first_work_ptr + tensor + 1)
    lanes = tl.arange(0, BLOCK)
    power = tl.zeros([BLOCK], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK], dtype=tl.int64)
    for offset in range(first, last, BLOCK):
        items = offset + lanes
        in_range = items < last
        partial = tl.load(partial_power_ptr + items, mask=in_range, other=0.0).to(tl.float64)
        if NORM_KIND == _INF:
            power = _nan_max(power, partial)
        else:
            power += partial
        nonfinite += tl.load(partial_nonfinite_ptr + items, mask=in_range, other=0).to(tl.int64)
    if NORM_KIND == _INF:
        total_power = tl.reduce(power, 0, _nan_max)
    else:
        total_power = tl.sum(power, 0)
    total_nonfinite = tl.sum(nonfinite, 0)
    tl.store(power_ptr + slot, total_power)
    tl.store(nonfinite_ptr + slot, total_nonfinite)
    if HISTOGRAM:
        columns = tl.arange(0, HIST_BINS)
        in_row = columns < NUM_BINS
        row = hist_ptr + slot * NUM_BINS
        counts = tl.load(row + columns, mask=in_row, other=0)
        counts = tl.where(columns == NONFINITE_COLUMN, counts - total_nonfinite, counts)
        nonzero = tl.sum(tl.where(columns >= 1, counts, 0), 0)
        numel = tl.load(numels_ptr + tensor)
        counts = tl.where(columns == 0, numel - total_nonfinite - nonzero, counts)
        tl.store(row + columns, counts, mask=in_row)


_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def _shared_counter_sets(device: torch.device, config: LaunchConfig, hist_bins: int) -> int:
    """How many sets of shared-memory histogram counters each program keeps; 0 selects
    tl.histogram (the interpreter, which cannot run the PTX, and bin counts too large).

    One set per lane of a warp where the counters fit (up to 256 bins), else lanes share
    sets round-robin (4 lanes per set at 1024 bins). More sets would not remove a
    collision, only add words to zero and sum per program. Every element of a block must
    belong to exactly one thread (no replicated lanes), hence ``block >= threads``.
    """
    # The counters are PTX: NVIDIA GPUs only (a ROCm build also calls its devices "cuda").
    if (device.type != "cuda" or torch.version.hip is not None
            or config.block < 32 * config.num_warps):
        return 0
    return min(32, _COUNTER_WORDS.value // hist_bins)


def partial_specs(work: WorkList) -> tuple[tuple, tuple]:
    """The scratch of one group's statistics, as ``native.new_tensors`` specs: each work
    item's power (in the accumulation dtype) and non-finite count."""
    acc_dtype = torch.float64 if work.dtype == torch.float64 else torch.float32
    return ((work.n_work,), acc_dtype, False), ((work.n_work,), torch.int32, False)


def accumulate_stats_(
    work: WorkList, p: float, norm_kind: NormKind, num_bins: int, min_exp: int,
    power: torch.Tensor, nonfinite: torch.Tensor, hist: torch.Tensor,
    partials: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Add one dtype group's statistics into the rows ``work.slots`` of the outputs.

    ``power`` (float64) and ``nonfinite`` (int64) rows are overwritten; ``hist`` (int64,
    ``[n, num_bins]``) rows must start at zero. ``num_bins == 0`` skips the histogram.
    ``partials``: scratch shaped by :func:`partial_specs`, made by the caller with the
    outputs (one allocation call for all of them).
    """
    stats_options, reduce_options = work.launch_memo(
        ("stats", norm_kind, num_bins, min_exp),
        lambda: _launch_options(work, norm_kind, num_bins, min_exp))
    partial_power, partial_nonfinite = partials
    if work.n_work > 0:
        _stats_kernel[(work.n_work,)](
            work.ptrs, work.numels, work.slots, work.work_tensor, work.work_chunk,
            partial_power, partial_nonfinite, hist, p, **stats_options)
    _reduce_chunks_kernel[(work.n_tensors,)](
        work.numels, work.slots, work.first_work, partial_power, partial_nonfinite,
        power, nonfinite, hist, **reduce_options)


def _launch_options(work: WorkList, norm_kind: NormKind, num_bins: int,
                    min_exp: int) -> tuple[dict, dict]:
    """The keyword arguments (constexprs, launch options) of the statistics and reduce
    kernels for one group and these options."""
    is_fp64 = work.dtype == torch.float64
    exp_shift, exp_bias, nonfinite_exp = FP64_LAYOUT if is_fp64 else FP32_LAYOUT
    histogram = num_bins > 0
    if histogram:
        hist_bins = triton.next_power_of_2(max(num_bins, 2))  # tl.histogram needs a power of 2
        hist_args = dict(NUM_BINS=num_bins, HIST_BINS=hist_bins, MIN_EXP=min_exp)
        # Non-finite values (all exponent bits set) were clamped into this column.
        nonfinite_column = min(max(nonfinite_exp - min_exp + 1, 1), max(num_bins - 1, 1))
    else:
        hist_args = _NO_HISTOGRAM
        nonfinite_column = 1
    counter_sets = (_shared_counter_sets(work.meta.device, work.config,
                                         hist_args["HIST_BINS"]) if histogram else 0)
    stats_options = dict(
        DTYPE=_TRITON_DTYPES[work.dtype], ACC_DTYPE=tl.float64 if is_fp64 else tl.float32,
        NORM_KIND=int(norm_kind), CHUNK=work.config.chunk, BLOCK=work.config.block,
        VEC=launch_vector_width(work.dtype, work.config.chunk, work.config.block),
        HISTOGRAM=histogram, EXP_SHIFT=exp_shift, EXP_BIAS=exp_bias,
        EXACT_SUBNORMALS=histogram and min_exp < 1 - exp_bias, **hist_args,
        COUNTER_SETS=counter_sets, num_warps=work.config.num_warps,
        enable_fp_fusion=ENABLE_FP_FUSION,
    )
    reduce_options = dict(
        NORM_KIND=int(norm_kind), BLOCK=REDUCE_BLOCK, HISTOGRAM=histogram,
        NUM_BINS=hist_args["NUM_BINS"], HIST_BINS=hist_args["HIST_BINS"],
        NONFINITE_COLUMN=nonfinite_column, num_warps=4, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    return stats_options, reduce_options
