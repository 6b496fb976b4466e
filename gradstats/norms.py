"""Norm types: validation and the split between fused and torch-composed norms.

The fused pass accumulates, per tensor, a "power": ``sum(|x|^p)`` for finite ``p > 0`` and
``max(|x|)`` for ``p = inf``. Norms follow as ``power^(1/p)``, and the total norm from the
sum (or max) of the powers, so per-tensor partials can be added across chunks, dtype
groups, devices or ranks before anything is finalised.

``p = 0``, ``p < 0`` and ``p = -inf`` have no such additive form; they take torch's own
composition (per-tensor ``vector_norm``, then ``vector_norm`` of the stacked norms).
"""
from __future__ import annotations

import enum
import math


class NormKind(enum.IntEnum):
    # Values are passed to the kernels as a compile-time switch.
    INF = 0
    L1 = 1
    L2 = 2
    LP = 3  # any other finite p > 0
    COMPOSED = 4  # p = 0, p < 0, p = -inf: torch's composition, no fused power


def parse_norm_type(norm_type: float | int | str) -> float:
    """``float(norm_type)`` as torch does, with a clear error for values that are no norm."""
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(
            f"norm_type must be a number or 'inf', got {norm_type!r}"
        ) from None
    if math.isnan(p):
        raise ValueError("norm_type must not be NaN")
    return p


def norm_kind(p: float) -> NormKind:
    if p == math.inf:
        return NormKind.INF
    if p == 1.0:
        return NormKind.L1
    if p == 2.0:
        return NormKind.L2
    if p > 0.0:
        return NormKind.LP
    return NormKind.COMPOSED
