"""Argument checks shared by every entry point, each raised before any gradient changes.

Errors name the offending tensor by its parameter name when names were given, otherwise
by its index among the parameters (or tensors) the caller passed: parameters without a
gradient still count, so ``parameter 1`` is ``parameters[1]``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .norms import NormKind, norm_kind
from .worklist import overlaps_itself

MAX_BINS = 1024  # one histogram row lives in registers during the pass
MIN_EXP_RANGE = (-1100, 1100)  # beyond float64's exponents every value is out of range


def describe(
    index: int,
    names: list[str] | None,
    what: str = "parameter",
    params: Sequence[torch.Tensor] | None = None,
) -> str:
    """How errors name gradient ``index``: its parameter's name, or its parameter's index.

    ``params`` are the parameters the gradients were taken from (those without a gradient
    included), so the index counts what the caller passed. Only error paths call this, so
    the positions are worked out here rather than on every call.
    """
    if names is not None:
        return repr(names[index])
    if params is not None:
        index = [i for i, param in enumerate(params) if param.grad is not None][index]
    return f"{what} {index}"


def _subject(index: int, names: list[str] | None, what: str, params) -> str:
    """``the gradient of parameter 1`` for gradients; ``tensor 1`` for plain tensors."""
    label = describe(index, names, what, params)
    if what == "parameter":
        return f"the gradient of {label}"
    return label if names is None else f"{what} {label}"


def non_negative_float(name: str, value: float) -> float:
    """``float(value)``, or a clear error for anything that is not a number >= 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if math.isnan(number) or number < 0:
        raise ValueError(f"{name} must be a non-negative number, got {number}")
    return number


def check_histogram_range(num_bins: int, min_exp: int) -> None:
    if not isinstance(num_bins, int) or not 2 <= num_bins <= MAX_BINS:
        raise ValueError(f"num_bins must be an int in [2, {MAX_BINS}], got {num_bins!r}")
    low, high = MIN_EXP_RANGE
    if not isinstance(min_exp, int) or not low <= min_exp <= high:
        raise ValueError(f"min_exp must be an int in [{low}, {high}], got {min_exp!r}")


def check_norm_inputs(
    tensors: list[torch.Tensor],
    names: list[str] | None,
    what: str,
    p: float | None = None,
    params: Sequence[torch.Tensor] | None = None,
    dtypes: frozenset[torch.dtype] | None = None,
) -> None:
    """Norms need floating-point or complex tensors, and sparse ones a fused norm type
    (``p > 0``): torch's composed norms have no sparse kernels. Say which tensor fails.
    ``dtypes``: the tensors' dtype set when the caller has it (from the call's route)."""
    if dtypes is None:
        dtypes = frozenset(t.dtype for t in tensors)  # the common case: one cheap pass
    if not _all_have_norms(frozenset(dtypes)):
        for index, tensor in enumerate(tensors):
            if not (tensor.is_floating_point() or tensor.is_complex()):
                raise TypeError(
                    f"{_subject(index, names, what, params)} has dtype {tensor.dtype}; "
                    "norms need floating-point or complex tensors"
                )
    if p is not None and norm_kind(p) == NormKind.COMPOSED:
        for index, tensor in enumerate(tensors):
            if tensor.layout is not torch.strided:
                raise ValueError(
                    f"sparse gradients need norm_type > 0 (or inf), got {p}: "
                    f"{_subject(index, names, what, params)} is {tensor.layout}"
                )


def _all_have_norms(dtypes: frozenset[torch.dtype]) -> bool:
    """Every dtype floating-point or complex: remembered per dtype set (the check cost ~1 us
    a call), except while compiling (dynamo warns on a cache it cannot keep)."""
    if torch.compiler.is_compiling():
        return _have_norms.__wrapped__(dtypes)
    return _have_norms(dtypes)


@functools.lru_cache(maxsize=64)  # a process sees a handful of dtype sets
def _have_norms(dtypes: frozenset[torch.dtype]) -> bool:
    return all(dtype.is_floating_point or dtype.is_complex for dtype in dtypes)


def check_total_norm(total_norm: torch.Tensor) -> None:
    """``total_norm`` must be 0-d, as torch's ``_foreach_mul_`` requires (a one-element
    1-d tensor too is rejected there)."""
    if total_norm.dim() != 0:
        raise RuntimeError(
            f"total_norm: scalar tensor expected to be 0 dim but it has {total_norm.dim()} "
            f"dimensions and {total_norm.numel()} elements."
        )


def check_clamp_inputs(
    grads: list[torch.Tensor], names: list[str] | None, clip_value: float,
    params: Sequence[torch.Tensor] | None = None,
) -> None:
    """What ``clamp_`` would reject, for every gradient before the first one is clamped:
    sparse and complex tensors, and a bound the gradient's dtype cannot hold (torch's
    scalar conversion raises for a finite value beyond the dtype's largest)."""
    kinds = {(g.dtype, g.layout) for g in grads}  # one cheap pass; the loops below are rare
    for dtype, layout in kinds:
        if layout is not torch.strided or dtype.is_complex:
            index = next(i for i, g in enumerate(grads) if (g.dtype, g.layout) == (dtype, layout))
            sparse = layout is not torch.strided
            raise NotImplementedError(
                f"clamp is not supported for {'sparse gradients' if sparse else 'complex types'}"
                f": {_subject(index, names, 'parameter', params)} is {layout if sparse else dtype}"
            )
        if (dtype.is_floating_point and not math.isinf(clip_value)
                and clip_value > torch.finfo(dtype).max):
            index = next(i for i, g in enumerate(grads) if g.dtype == dtype)
            raise RuntimeError(
                f"clip_value {clip_value} cannot be converted to type {dtype} without "
                f"overflow ({_subject(index, names, 'parameter', params)} is {dtype}, "
                f"whose largest value is {torch.finfo(dtype).max})"
            )


def check_updatable(
    grads: list[torch.Tensor], names: list[str] | None,
    params: Sequence[torch.Tensor] | None = None,
    all_contiguous: bool | None = None,
) -> None:
    """An expanded gradient (elements sharing memory) cannot be updated in place; torch
    fails on it after updating the gradients before it, here before any. ``all_contiguous``:
    True when the caller knows every gradient is contiguous (from the call's plan, whose key
    fixes shapes and strides); None: read here."""
    if all_contiguous:
        return
    try:
        if all(map(torch.Tensor.is_contiguous, grads)):
            return  # the common case: one cheap call per tensor
    except RuntimeError:  # sparse tensors have no is_contiguous; they own their values
        pass
    for index, grad in enumerate(grads):
        if overlaps_itself(grad):
            raise RuntimeError(
                f"unsupported operation: {_subject(index, names, 'parameter', params)} is "
                "expanded (more than one of its elements refers to a single memory location), "
                "so it cannot be updated in place; nothing was modified. Clone it first."
            )
