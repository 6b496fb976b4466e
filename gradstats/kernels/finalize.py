"""Finalize: per-tensor powers -> per-tensor norms, the total norm and the clip coefficient.

``_finalize_kernel`` is a single program: it walks the power vector in fixed-size steps (so
the total is summed in the same order every call), writes ``norms[i] = power[i]^(1/p)``
(p = 1, 2 or inf),
then ``total = (sum power)^(1/p)`` (max for the inf-norm, NaN propagating) and
``clip_coef = min(max_norm / (total + 1e-6), 1)``. Arithmetic is float64; stores cast to
the output dtypes. Everything stays on the device.
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from ..norms import NormKind
from .stats import ENABLE_FP_FUSION, _nan_max

_INF: tl.constexpr = tl.constexpr(NormKind.INF.value)
_L2: tl.constexpr = tl.constexpr(NormKind.L2.value)
FINALIZE_BLOCK = 1024


@triton.jit
def _root(power, NORM_KIND: tl.constexpr):
    # Only the norms with an exact float64 root here; general p is finalised by torch.
    if NORM_KIND == _L2:
        return tl.sqrt(power)
    else:
        return power


# ``n`` (the tensor count) is not specialized: Triton would otherwise compile one kernel for
# n == 1, one for n % 16 == 0 and one for the rest, and a loop bound gains nothing from it.
@triton.jit(do_not_specialize=["n"])
def _finalize_kernel(
    power_ptr, n, norms_ptr, total_ptr, coef_ptr,
    max_norm_hi, max_norm_lo, NORM_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    # Float scalars reach a kernel as fp32; a float64 one travels as an hi + lo fp32 pair.
    max_norm = tl.cast(max_norm_hi, tl.float64) + tl.cast(max_norm_lo, tl.float64)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for offset in range(0, n, BLOCK):
        index = offset + lanes
        in_range = index < n
        power = tl.load(power_ptr + index, mask=in_range, other=0.0)
        norm = _root(power, NORM_KIND)
        tl.store(norms_ptr + index, norm.to(norms_ptr.dtype.element_ty), mask=in_range)
        if NORM_KIND == _INF:
            acc = _nan_max(acc, power)
        else:
            acc += power
    if NORM_KIND == _INF:
        total_power = tl.reduce(acc, 0, _nan_max)
    else:
        total_power = tl.sum(acc, 0)
    total = _root(total_power, NORM_KIND)
    tl.store(total_ptr, total.to(total_ptr.dtype.element_ty))
    # 1e-6 and the clamp at 1 match torch.nn.utils.clip_grads_with_norm_; a NaN total
    # gives a NaN coefficient there too, so the clamp must propagate NaN.
    coef = max_norm / (total + 1e-6)
    coef = tl.minimum(coef, 1.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(coef_ptr, coef.to(coef_ptr.dtype.element_ty))


def _split_fp64(value: float) -> tuple[float, float]:
    """``value`` as two fp32 numbers whose sum carries about 48 bits of it."""
    try:
        hi = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond fp32: inf behaves the same in every use here
        return math.copysign(math.inf, value), 0.0
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, value - hi


def finalize_(
    power: torch.Tensor, norm_kind: NormKind, max_norm: float,
    norms: torch.Tensor, total: torch.Tensor, clip_coef: torch.Tensor,
) -> None:
    """Fill ``norms`` ([n]), ``total`` and ``clip_coef`` (0-d) from ``power`` (float64, [n]).
    For the inf-, 1- and 2-norms."""
    assert norm_kind in (NormKind.INF, NormKind.L1, NormKind.L2), norm_kind
    _finalize_kernel[(1,)](
        power, power.numel(), norms, total, clip_coef, *_split_fp64(max_norm),
        NORM_KIND=int(norm_kind), BLOCK=FINALIZE_BLOCK, num_warps=4,
        enable_fp_fusion=ENABLE_FP_FUSION,
    )
