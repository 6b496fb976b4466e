"""In-place multi-tensor updates over the same work lists as the statistics pass.

``_scale_kernel``: ``g *= clip_coef``, with the coefficient read on the device. Every
  program first reads the coefficient and, when it is >= 1 (no clipping needed), returns
  without touching the gradients: zero memory traffic and bit-identical gradients, where
  torch multiplies every gradient by 1.0. A NaN coefficient does scale (torch's result).
``_clamp_kernel``: ``g = min(max(g, lo), hi)`` in one read and one write, where torch's
  ``clip_grad_value_`` makes two passes (clamp_min_, then clamp_max_). NaN stays NaN.
One program per work item (a chunk of one tensor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..worklist import WorkList
from .stats import _TRITON_DTYPES


@triton.jit
def _chunk_bounds(ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr,
                  DTYPE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    work = tl.program_id(0)
    tensor = tl.load(work_tensor_ptr + work)
    base = tl.load(ptrs_ptr + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    start = tl.load(work_chunk_ptr + work) * CHUNK
    length = tl.minimum(tl.load(numels_ptr + tensor) - start, CHUNK)
    return base + start, length


@triton.jit
def _scale_kernel(
    ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr, coef_ptr,
    DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    coef = tl.load(coef_ptr).to(ACC_DTYPE)
    if (coef < 1.0) | (coef != coef):
        chunk, length = _chunk_bounds(ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr,
                                      DTYPE, CHUNK, ALIGNED)
        lanes = tl.arange(0, BLOCK)
        full = (length // BLOCK) * BLOCK
        for offset in range(0, full, BLOCK):
            x = tl.load(chunk + offset + lanes)
            tl.store(chunk + offset + lanes, (x.to(ACC_DTYPE) * coef).to(DTYPE))
        if full < length:
            offsets = full + lanes
            in_range = offsets < length
            x = tl.load(chunk + offsets, mask=in_range)
            tl.store(chunk + offsets, (x.to(ACC_DTYPE) * coef).to(DTYPE), mask=in_range)


@triton.jit
def _clamp(x, lo, hi, ACC_DTYPE: tl.constexpr):
    x = x.to(ACC_DTYPE)
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_kernel(
    ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr, lo, hi,
    DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    chunk, length = _chunk_bounds(ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr,
                                  DTYPE, CHUNK, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    full = (length // BLOCK) * BLOCK
    for offset in range(0, full, BLOCK):
        x = tl.load(chunk + offset + lanes)
        tl.store(chunk + offset + lanes, _clamp(x, lo, hi, ACC_DTYPE).to(DTYPE))
    if full < length:
        offsets = full + lanes
        in_range = offsets < length
        x = tl.load(chunk + offsets, mask=in_range)
        tl.store(chunk + offsets, _clamp(x, lo, hi, ACC_DTYPE).to(DTYPE), mask=in_range)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def scale_(work: WorkList, clip_coef: torch.Tensor) -> None:
    """Multiply the group's tensors in place by the 0-d device tensor ``clip_coef``."""
    if work.n_work == 0:
        return
    _scale_kernel[(work.n_work,)](
        work.ptrs, work.numels, work.work_tensor, work.work_chunk, clip_coef,
        DTYPE=_TRITON_DTYPES[work.dtype], ACC_DTYPE=_acc_dtype(work.dtype),
        CHUNK=work.config.chunk, BLOCK=work.config.block, ALIGNED=work.aligned,
        num_warps=work.config.num_warps,
    )


def clamp_(work: WorkList, lo: float, hi: float) -> None:
    """Clamp the group's tensors in place into ``[lo, hi]`` (fp32 bounds; not for fp64)."""
    if work.n_work == 0:
        return
    _clamp_kernel[(work.n_work,)](
        work.ptrs, work.numels, work.work_tensor, work.work_chunk, lo, hi,
        DTYPE=_TRITON_DTYPES[work.dtype], ACC_DTYPE=_acc_dtype(work.dtype),
        CHUNK=work.config.chunk, BLOCK=work.config.block, ALIGNED=work.aligned,
        num_warps=work.config.num_warps,
    )
