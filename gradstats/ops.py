"""The ``gradstats::`` operators: one schema for every backend.

Each op is a ``torch.library.custom_op`` so ``torch.compile`` sees it as one opaque call
(the launchers read ``data_ptr()``, which cannot be traced), with a fake implementation
beside it that only describes the outputs.

The dispatcher picks the device's implementation: each op registers a CPU kernel and a
CUDA kernel. The CPU kernel knows every tensor is on the CPU (the dispatcher sends a call
there only then), so it routes by ``GRADSTATS_BACKEND`` alone (:func:`_cpu_route`): the
native C++ ops (``gradstats._C``) when built and allowed, else the PyTorch reference, or the
Triton interpreter. The CUDA kernel takes the Triton route (:func:`dispatch.route`: plan
cache, dtype groups). A ``scale_``/``clamp_`` list spanning several devices dispatches on
its highest-priority device, CUDA, whose kernel updates each device's tensors on that
device's backend (``dispatch._by_device``). The default implementation, the same routing
as the CUDA kernel's, serves any other device.

In eager mode the wrappers at the bottom call the implementation directly, with the
call's :func:`route` (resolved once per call), and never go through the dispatcher: a
custom op boxes its arguments, so a call with a list of thousands of gradients pays a
per-tensor toll in Python (boxing, alias and schema checks) that costs more host time
than the whole pass is allowed. Under ``torch.compile`` they go through the ops, whose
per-call cost the compiled graph pays once per step.

Contracts (``n`` tensors, all on one device for ``accumulate_stats``):

- ``accumulate_stats(tensors, norm_type, num_bins, min_exp) -> (power, nonfinite, hist)``:
  ``power[i]`` is ``sum |x|^p`` (``max |x|`` for inf) in float64, ``nonfinite[i]`` the
  NaN/Inf count (int64), ``hist[i]`` the ``num_bins`` log2-magnitude counts (int64).
- ``finalize(power, norm_type, max_norm, norms_dtype) -> (norms, total_norm, clip_coef)``
  (the eager wrapper also takes the call's resolved ``backend``, sparing a second choice).
- ``scale_(tensors, clip_coef)``: in-place ``t *= clip_coef``, nothing done when >= 1.
- ``clamp_(tensors, lo, hi)``: in-place clamp.
"""
from __future__ import annotations

import torch

from . import dispatch
from .backend import Backend, choose_backend

_CPU = torch.device("cpu")
_DTYPE_OF = torch.Tensor.dtype.__get__


def _cpu_route(tensors: list[torch.Tensor]) -> dispatch.Route | None:
    """The route of tensors the dispatcher sent to a CPU kernel, so all on the CPU: the
    backend from ``GRADSTATS_BACKEND`` alone, with no pass over devices. None on the Triton
    interpreter: the dispatch functions build its plan."""
    backend = choose_backend(_CPU)
    if backend is Backend.TRITON:
        return None
    return dispatch.Route(_CPU, backend, None, frozenset(map(_DTYPE_OF, tensors)))


@torch.library.custom_op("gradstats::accumulate_stats", mutates_args=())
def _accumulate_stats_op(
    tensors: list[torch.Tensor], norm_type: float, num_bins: int, min_exp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.accumulate_stats(tensors, norm_type, num_bins, min_exp)


@_accumulate_stats_op.register_kernel("cpu")
def _(tensors, norm_type, num_bins, min_exp):
    return dispatch.accumulate_stats(tensors, norm_type, num_bins, min_exp, _cpu_route(tensors))


@_accumulate_stats_op.register_kernel("cuda")
def _(tensors, norm_type, num_bins, min_exp):
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


# A few scalar ops on one small tensor: dispatch.finalize runs Triton on a Triton backend
# and the reference otherwise (no native version: nothing there for C++ to speed up).
@_finalize_op.register_kernel(("cpu", "cuda"))
def _(power, norm_type, max_norm, norms_dtype):
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


@_scale_op.register_kernel("cpu")
def _(tensors, clip_coef):
    dispatch.scale_(tensors, clip_coef, _cpu_route(tensors))


@_scale_op.register_kernel("cuda")  # also any list with a CUDA tensor: grouped by device
def _(tensors, clip_coef):
    dispatch.scale_(tensors, clip_coef)


@_scale_op.register_fake
def _(tensors, clip_coef):
    return None


@torch.library.custom_op("gradstats::clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[torch.Tensor], lo: float, hi: float) -> None:
    dispatch.clamp_(tensors, lo, hi)


@_clamp_op.register_kernel("cpu")
def _(tensors, lo, hi):
    dispatch.clamp_(tensors, lo, hi, _cpu_route(tensors))


@_clamp_op.register_kernel("cuda")  # also any list with a CUDA tensor: grouped by device
def _(tensors, lo, hi):
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


def finalize(power, norm_type, max_norm, norms_dtype, backend=None):
    if _compiling():
        return _finalize_op(power, norm_type, max_norm, norms_dtype)
    return dispatch.finalize(power, norm_type, max_norm, norms_dtype, backend)


def scale_(tensors, clip_coef, tensors_route=None) -> None:
    if _compiling():
        return _scale_op(tensors, clip_coef)
    return dispatch.scale_(tensors, clip_coef, tensors_route)


def clamp_(tensors, lo, hi) -> None:
    if _compiling():
        return _clamp_op(tensors, lo, hi)
    return dispatch.clamp_(tensors, lo, hi)
