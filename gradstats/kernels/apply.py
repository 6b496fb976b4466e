"""In-place multi-tensor updates over the same work lists as the statistics pass.

``_update_kernel`` with ``OP``:
- ``_SCALE``: ``g *= clip_coef``, with the coefficient read on the device. Every program
  first reads the coefficient and, when it is >= 1 (no clipping needed), returns without
  touching the gradients: zero memory traffic and bit-identical gradients, where torch
  multiplies every gradient by 1.0. A NaN coefficient does scale (torch's result).
- ``_CLAMP``: ``g = min(max(g, lo), hi)`` in one read and one write, where torch's
  ``clip_grad_value_`` makes two passes (clamp_min_, then clamp_max_). NaN stays NaN.
One program per work item (a chunk of one tensor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..worklist import WorkList
from .chunks import _vector_end, _work_item, launch_vector_width
from .stats import _TRITON_DTYPES, ENABLE_FP_FUSION

_SCALE: tl.constexpr = tl.constexpr(0)
_CLAMP: tl.constexpr = tl.constexpr(1)


@triton.jit
def _updated(x, coef, lo, hi, OP: tl.constexpr, DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    x = x.to(ACC_DTYPE)
    if OP == _SCALE:
        x = x * coef
    else:
        x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
        x = tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)
    return x.to(DTYPE)


@triton.jit
def _update_part(pointers, mask, coef, lo, hi, OP: tl.constexpr, DTYPE: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """One masked part of a chunk (head, remainder, tail vectors) read and written back."""
    x = tl.load(pointers, mask=mask)
    tl.store(pointers, _updated(x, coef, lo, hi, OP, DTYPE, ACC_DTYPE), mask=mask)


@triton.jit
def _update_kernel(
    ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr, coef_ptr, lo, hi,
    OP: tl.constexpr, DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    if OP == _SCALE:
        coef = tl.load(coef_ptr).to(ACC_DTYPE)
        active = (coef < 1.0) | (coef != coef)  # a NaN coefficient scales, as in torch
    else:
        coef = 1.0
        active = True
    if active:
        _, chunk, body, length, head = _work_item(
            ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr, DTYPE, CHUNK, VEC)
        lanes = tl.arange(0, BLOCK)
        body_length = length - head
        vector_end = _vector_end(body_length, VEC)
        full = (body_length // BLOCK) * BLOCK
        # The parts of chunks.py: scalar accesses only for the < 16 bytes at either end.
        # Head and remainder each at contiguous addresses: one gathered access for both
        # (as the statistics kernel reads them) keeps a 64-bit address per element live
        # from the load to the store, 20 to 45 registers more on Triton 3.9.
        if head > 0:
            _update_part(chunk + lanes, lanes < head, coef, lo, hi, OP, DTYPE, ACC_DTYPE)
        if vector_end < body_length:
            offsets = vector_end + lanes
            _update_part(body + offsets, offsets < body_length, coef, lo, hi, OP, DTYPE,
                         ACC_DTYPE)
        for offset in range(0, full, BLOCK):
            x = tl.load(body + offset + lanes)
            tl.store(body + offset + lanes, _updated(x, coef, lo, hi, OP, DTYPE, ACC_DTYPE))
        if full < vector_end:
            offsets = full + lanes
            _update_part(body + offsets, offsets < vector_end, coef, lo, hi, OP, DTYPE,
                         ACC_DTYPE)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch(work: WorkList, op, clip_coef: torch.Tensor | None, lo: float, hi: float) -> None:
    if work.n_work == 0:
        return
    options = work.launch_memo(("update", op.value), lambda: dict(
        OP=op, DTYPE=_TRITON_DTYPES[work.dtype], ACC_DTYPE=_acc_dtype(work.dtype),
        CHUNK=work.config.chunk, BLOCK=work.config.block,
        VEC=launch_vector_width(work.dtype, work.config.chunk, work.config.block),
        num_warps=work.config.num_warps, enable_fp_fusion=ENABLE_FP_FUSION,
    ))
    _update_kernel[(work.n_work,)](
        work.ptrs, work.numels, work.work_tensor, work.work_chunk, clip_coef, lo, hi, **options)


def scale_(work: WorkList, clip_coef: torch.Tensor) -> None:
    """Multiply the group's tensors in place by the 0-d device tensor ``clip_coef``."""
    _launch(work, _SCALE, clip_coef, 0.0, 0.0)


def clamp_(work: WorkList, lo: float, hi: float) -> None:
    """Clamp the group's tensors in place into ``[lo, hi]`` (fp32 bounds; not for fp64)."""
    _launch(work, _CLAMP, None, lo, hi)
