"""The ``gradstats::`` operators: one schema for every backend.

Each op is a ``torch.library.custom_op`` so ``torch.compile`` sees it as one opaque call
(the launchers read ``data_ptr()``, which cannot be traced), with a fake implementation
beside it that only describes the outputs. A native CPU pass can later register under the
same names. In eager mode the wrappers below call the implementation directly and skip the
dispatcher's per-call overhead, and take the call's :func:`route` (resolved once per call);
under ``torch.compile`` they go through the op, which resolves its own.

Contracts (``n`` tensors, all on one device for ``accumulate_stats``):

- ``accumulate_stats(tensors, norm_type, num_bins, min_exp) -> (power, nonfinite, hist)``:
  ``power[i]`` is ``sum |x|^p`` (``max |x|`` for inf) in float64, ``nonfinite[i]`` the
  NaN/Inf count (int64), ``hist[i]`` the ``num_bins`` log2-magnitude counts (int64).
- ``finalize(power, norm_type, max_norm, norms_dtype) -> (norms, total_norm, clip_coef)``.
- ``scale_(tensors, clip_coef)``: in-place ``t *= clip_coef``, nothing done when >= 1.
- ``clamp_(tensors, lo, hi)``: in-place clamp.
"""
from __future__ import annotations

import torch

from . import dispatch


@torch.library.custom_op("gradstats::accumulate_stats", mutates_args=())
def _accumulate_stats_op(
    tensors: list[torch.Tensor], norm_type: float, num_bins: int, min_exp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.accumulate_stats(tensors, norm_type, num_bins, min_exp)


@_accumulate_stats_op.register_fake
def _(tensors, norm_type, num_bins, min_exp):
    device, n = tensors[0].device, len(tensors)
    return (
        torch.empty(n, dtype=torch.float64, device=device),
        torch.empty(n, dtype=torch.int64, device=device),
        torch.empty(n, num_bins, dtype=torch.int64, device=device),
    )


@torch.library.custom_op("gradstats::finalize", mutates_args=())
def _finalize_op(
    power: torch.Tensor, norm_type: float, max_norm: float, norms_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.finalize(power, norm_type, max_norm, norms_dtype)


@_finalize_op.register_fake
def _(power, norm_type, max_norm, norms_dtype):
    return (
        torch.empty(power.shape, dtype=norms_dtype, device=power.device),
        torch.empty((), dtype=norms_dtype, device=power.device),
        torch.empty((), dtype=norms_dtype, device=power.device),
    )


@torch.library.custom_op("gradstats::scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[torch.Tensor], clip_coef: torch.Tensor) -> None:
    dispatch.scale_(tensors, clip_coef)


@_scale_op.register_fake
def _(tensors, clip_coef):
    return None


@torch.library.custom_op("gradstats::clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[torch.Tensor], lo: float, hi: float) -> None:
    dispatch.clamp_(tensors, lo, hi)


@_clamp_op.register_fake
def _(tensors, lo, hi):
    return None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def route(tensors) -> dispatch.Route | None:
    """This call's :class:`dispatch.Route` for non-empty ``tensors``, to hand to the ops
    below; None under ``torch.compile`` (the ops resolve their own at run time)."""
    if _compiling():
        return None
    return dispatch.route(tensors)


def accumulate_stats(tensors, norm_type, num_bins, min_exp, tensors_route=None):
    if _compiling():
        return _accumulate_stats_op(tensors, norm_type, num_bins, min_exp)
    return dispatch.accumulate_stats(tensors, norm_type, num_bins, min_exp, tensors_route)


def finalize(power, norm_type, max_norm, norms_dtype):
    if _compiling():
        return _finalize_op(power, norm_type, max_norm, norms_dtype)
    return dispatch.finalize(power, norm_type, max_norm, norms_dtype)


def scale_(tensors, clip_coef, tensors_route=None) -> None:
    if _compiling():
        return _scale_op(tensors, clip_coef)
    return dispatch.scale_(tensors, clip_coef, tensors_route)


def clamp_(tensors, lo, hi) -> None:
    if _compiling():
        return _clamp_op(tensors, lo, hi)
    return dispatch.clamp_(tensors, lo, hi)
