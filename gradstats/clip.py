"""Drop-in replacements for ``torch.nn.utils``' clipping functions, on the fused pass.

Same signatures, inputs, results, warnings and error texts as torch (>= 2.6), with these
differences, all where torch fails or is needlessly slow:

- the total norm is accumulated in float32 (float64 for float64 gradients) from one read
  of every gradient, instead of per-tensor norms rounded to each gradient's dtype. Each
  chunk's sum of ``|x|^p`` is float32 on every backend, so a lone float32 element above
  ~1.8e19 gives an infinite 2-norm where torch returns its magnitude (with two or more
  such elements torch overflows too);
- an empty tensor contributes nothing to the inf-norm (torch raises);
- when no clipping is needed the Triton path does not touch the gradients at all (torch
  multiplies every one by 1.0): no memory traffic. Every path leaves them bit-identical;
- a view listed twice (same address, shape, strides and dtype) is updated once, not
  twice: two updates of one element at once would race on a GPU. Gradients that overlap
  without being the same view (a prefix of a buffer and the buffer, shifted slices) are
  each updated, one after the other, as torch does: an element two of them share is
  scaled twice, exactly torch's result, on every backend (such gradients leave the
  parallel kernel launch for the reference path);
- ``error_if_nonfinite=True`` names the parameters holding NaN/Inf;
- ``max_norm=inf`` never changes a gradient. torch multiplies every gradient by
  ``clamp(inf / (total + 1e-6), max=1)``, which is NaN when the total is: one NaN gradient
  turns all of them NaN, and the Hugging Face Trainer measures its norm exactly that way,
  hiding where the NaN came from;
- every check runs before the first gradient changes, on every backend: a negative or
  NaN ``max_norm``/``clip_value``, a ``total_norm`` that is not 0-d, sparse or complex
  gradients for ``clip_grad_value_``, a ``clip_value`` beyond a gradient dtype's range,
  sparse gradients with ``norm_type`` 0, < 0 or -inf, an expanded gradient (which no
  in-place update can write). Errors name the parameter (by name, or by its index among
  the parameters passed).

Every function also takes an ``nn.Module`` or ``named_parameters()`` pairs, so errors can
name parameters. ``foreach`` is accepted for compatibility and has no effect.
"""
from __future__ import annotations

import math

import torch

from . import distributed, ops, reference
from .checks import (
    check_clamp_inputs,
    check_norm_inputs,
    check_total_norm,
    check_updatable,
    describe,
    non_negative_float,
)
from .grad_mode import no_grad
from .host_path import local_gradients_and_route
from .norms import parse_norm_type
from .params import ParametersLike, gradients, named_items, norm_result_dtype
from .stats import FusedResult, fused_pass

__all__ = [
    "fused_clip_grad_norm_",
    "get_total_norm",
    "clip_grads_with_norm_",
    "clip_grad_value_",
]


def _check_foreach(foreach: bool | None) -> None:
    if foreach not in (None, True, False):
        raise TypeError(f"foreach must be None or a bool, got {foreach!r}")


def _in_dtype(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``total.to(dtype)``, without the call when it has that dtype (~0.9 us)."""
    return total if total.dtype is dtype else total.to(dtype)


def _norms_pass(grads: list[torch.Tensor], p: float, max_norm: float, route,
                sharding=None) -> FusedResult:
    return fused_pass(grads, p, num_bins=0, min_exp=0, max_norm=max_norm, route=route,
                      sharding=sharding)


def _raise_if_nonfinite(result: FusedResult, total: torch.Tensor, p: float,
                        names: list[str] | None, what: str, params=None,
                        sharding=None) -> None:
    """``total`` is the norm as returned, in torch's dtype: an fp16 total can overflow
    where the float32 one did not, and torch raises then too. ``params``: the parameters
    the gradients came from, so indices count what the caller passed. ``sharding``: the
    call's layout; every rank sees the same global total, so all raise together."""
    # The one deliberate host sync here: the user asked for a check on the value.
    if bool(torch.isfinite(total)):
        return
    counts = distributed.global_counts(sharding, result.nonfinite).tolist()
    offenders = [f"{describe(i, names, what, params)} ({count} NaN/Inf)"
                 for i, count in enumerate(counts) if count]
    if offenders:
        detail = "Non-finite values in the gradients of: " + ", ".join(offenders) + "."
    else:
        detail = (f"No gradient holds NaN or Inf: the norm ({result.total_norm.item():.6g}) "
                  f"overflowed {total.dtype}.")
    raise RuntimeError(
        f"The total norm of order {p} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. To disable this error and scale the gradients by the non-finite "
        f"norm anyway, set `error_if_nonfinite=False`. {detail}"
    )


@no_grad
def get_total_norm(
    tensors: ParametersLike,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group=None,
) -> torch.Tensor:
    r"""Compute the norm of an iterable of tensors.

    The norm is computed over the norms of the individual tensors, as if the norms of the
    individual tensors were concatenated into a single vector. Drop-in for
    :func:`torch.nn.utils.get_total_norm`, computed by one fused pass.

    Args:
        tensors (Iterable[Tensor] or Tensor): an iterable of Tensors or a single Tensor
            that will be normalized (or ``(name, tensor)`` pairs)
        norm_type (float): type of the used p-norm. Can be ``'inf'`` for infinity norm.
        error_if_nonfinite (bool): if True, an error naming the tensors that hold NaN/Inf
            is thrown if the total norm is ``nan``, ``inf``, or ``-inf``. Default: ``False``
        foreach (bool): accepted for compatibility; ignored. Default: ``None``
        process_group (ProcessGroup, optional): the group plain tensors are sharded over by
            hand; their partials are summed over it. ``DTensor`` s are combined over their
            own mesh without it. Default: ``None``

    Returns:
        Total norm of the tensors (viewed as a single vector), with torch's dtype and
        device (the first tensor's); a ``DTensor`` replicated over the first ``DTensor``'s
        mesh when there is one (see :mod:`gradstats.distributed`).
    """
    _check_foreach(foreach)
    p = parse_norm_type(norm_type)
    tensors, names = named_items(tensors)
    if not tensors:
        return torch.tensor(0.0)
    sharding = distributed.local_view(tensors, process_group, with_counts=False)
    if sharding is not None:
        tensors = sharding.tensors
    route = ops.route(tensors)  # once per call: plan, device and dtype facts
    dtypes = route and route.dtypes
    check_norm_inputs(tensors, names, "tensor", p, dtypes=dtypes)
    result = _norms_pass(tensors, p, math.inf, route, sharding)
    total = _in_dtype(result.total_norm, norm_result_dtype(tensors, dtypes))
    if error_if_nonfinite:
        _raise_if_nonfinite(result, total, p, names, "tensor", sharding=sharding)
    return distributed.as_total(total, sharding)


@no_grad
def clip_grads_with_norm_(
    parameters: ParametersLike,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    r"""Scale the gradients of an iterable of parameters given a pre-calculated total norm and desired max norm.

    The gradients will be scaled by the following calculation

    .. math::
        grad = grad * \min(\frac{max\_norm}{total\_norm + 1e-6}, 1)

    Gradients are modified in-place; when the coefficient is 1 they stay bit-identical (and
    the Triton path does not touch them at all).
    Drop-in for :func:`torch.nn.utils.clip_grads_with_norm_`.

    Args:
        parameters (Iterable[Tensor] or Tensor): an iterable of Tensors or a single Tensor
            that will have gradients normalized
        max_norm (float): max norm of the gradients (non-negative)
        total_norm (Tensor): total norm of the gradients to use for clipping (a
            ``DTensor`` one, gradstats' or torch's, is read as its global value; ``DTensor``
            gradients are scaled through their local tensors)
        foreach (bool): accepted for compatibility; ignored. Default: ``None``

    Returns:
        None
    """
    _check_foreach(foreach)
    max_norm = non_negative_float("max_norm", max_norm)
    params, names = named_items(parameters)
    # once per call: gradients, plan, device and dtype facts
    # DTensor gradients are scaled through their local tensors: a replicated coefficient
    # needs no redistribution. A DTensor total (torch's, or ours) is read as its value.
    grads, names, route, _ = local_gradients_and_route(params, names, statistics=False)
    if not grads:
        return
    total_norm = distributed.plain_total(total_norm)
    # An integer gradient cannot take a fractional coefficient in place: torch fails on it
    # after scaling the others; here nothing is scaled.
    check_norm_inputs(grads, names, "parameter", params=params, dtypes=route and route.dtypes)
    check_updatable(grads, names, params, route and route.all_contiguous)
    total_norm = torch.as_tensor(total_norm)
    check_total_norm(total_norm)
    # torch's formula, in total_norm's dtype and on its device, so results match torch.
    if max_norm == math.inf:
        return  # no clipping asked for (see the module docstring)
    clip_coef = torch.clamp(max_norm / (total_norm + reference.EPS), max=1.0)
    ops.scale_(grads, clip_coef, route)


@no_grad
def fused_clip_grad_norm_(
    parameters: ParametersLike,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group=None,
) -> torch.Tensor:
    r"""Clip the gradient norm of an iterable of parameters.

    The norm is computed over the norms of the individual gradients of all parameters, as
    if the norms of the individual gradients were concatenated into a single vector.
    Gradients are modified in-place. Drop-in for :func:`torch.nn.utils.clip_grad_norm_`:
    one fused read of every gradient for the norm, and a scale pass that does nothing
    when no clipping is needed.

    Args:
        parameters (Iterable[Tensor] or Tensor): an iterable of Tensors or a single Tensor
            that will have gradients normalized (or an ``nn.Module``, or
            ``named_parameters()`` pairs, so errors can name parameters)
        max_norm (float): max norm of the gradients (non-negative)
        norm_type (float, optional): type of the used p-norm. Can be ``'inf'`` for
            infinity norm. Default: 2.0
        error_if_nonfinite (bool, optional): if True, an error naming the offending
            parameters is thrown if the total norm of the gradients from
            :attr:`parameters` is ``nan``, ``inf``, or ``-inf``; nothing is modified then.
            Default: False
        foreach (bool, optional): accepted for compatibility; ignored. Default: ``None``
        process_group (ProcessGroup, optional): the group plain gradients are sharded over
            by hand (ZeRO-style flat buffers); their partials are summed over it.
            ``DTensor`` gradients are combined over their own mesh without it, and plain
            gradients without it (DDP) need no communication. Default: ``None``

    Returns:
        Total norm of the parameter gradients (viewed as a single vector); a ``DTensor``
        replicated over the first ``DTensor`` gradient's mesh when there is one.
    """
    _check_foreach(foreach)
    p = parse_norm_type(norm_type)
    max_norm = non_negative_float("max_norm", max_norm)
    # stacklevel: the warning points at the caller, as torch's does.
    params, names = named_items(parameters, warn_empty_generator=True, stacklevel=3)
    # once per call: gradients, plan, device and dtype facts
    grads, names, route, sharding = local_gradients_and_route(
        params, names, process_group, with_counts=False)
    if not grads:
        return torch.tensor(0.0)
    dtypes = route and route.dtypes
    check_norm_inputs(grads, names, "parameter", p, params, dtypes)
    check_updatable(grads, names, params, route and route.all_contiguous)
    result = _norms_pass(grads, p, max_norm, route, sharding)
    total = _in_dtype(result.total_norm, norm_result_dtype(grads, dtypes))
    if error_if_nonfinite:
        _raise_if_nonfinite(result, total, p, names, "parameter", params, sharding)
    if max_norm != math.inf:  # inf: no clipping asked for (see the module docstring)
        targets = grads if sharding is None else sharding.targets
        ops.scale_(targets, result.clip_coef, route if targets is grads else None)
    return distributed.as_total(total, sharding)


@no_grad
def clip_grad_value_(
    parameters: ParametersLike,
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    r"""Clip the gradients of an iterable of parameters at specified value.

    Gradients are modified in-place, in one read and one write each. Drop-in for
    :func:`torch.nn.utils.clip_grad_value_`.

    Args:
        parameters (Iterable[Tensor] or Tensor): an iterable of Tensors or a single Tensor
            that will have gradients normalized
        clip_value (float): maximum allowed value of the gradients (non-negative). The
            gradients are clipped in the range
            :math:`\left[\text{-clip\_value}, \text{clip\_value}\right]`
        foreach (bool, optional): accepted for compatibility; ignored. Default: ``None``
    """
    _check_foreach(foreach)
    clip_value = non_negative_float("clip_value", clip_value)
    params, names = named_items(parameters)
    grads, names = gradients(params, names)
    if grads:
        check_clamp_inputs(grads, names, clip_value, params)
        check_updatable(grads, names, params)
        ops.clamp_(grads, -clip_value, clip_value)


# One import swaps torch's clipping for gradstats':
#     from gradstats import clip_grad_norm_, clip_grad_value_, get_total_norm, clip_grads_with_norm_
clip_grad_norm_ = fused_clip_grad_norm_
