"""Turning what users pass as ``parameters`` into gradients (and names, when known)."""
from __future__ import annotations

import collections
import functools
import itertools
import operator
import types
import warnings
from collections.abc import Iterable
from typing import Union

import torch
from torch import nn

from . import native

ParametersLike = Union[
    torch.Tensor, nn.Module, Iterable[torch.Tensor], Iterable[tuple[str, torch.Tensor]]
]

_REAL_OF_COMPLEX = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def named_items(
    parameters: ParametersLike, *, warn_empty_generator: bool = False, stacklevel: int = 1
) -> tuple[list[torch.Tensor], list[str] | None]:
    """The tensors in ``parameters`` and their names (``None`` when none were given).

    Accepts a tensor, an ``nn.Module`` (its ``named_parameters()``), an iterable of
    tensors, or an iterable of ``(name, tensor)`` pairs such as ``named_parameters()``.
    """
    if isinstance(parameters, torch.Tensor):
        return [parameters], None
    if isinstance(parameters, nn.Module):
        parameters = unwrap_model(parameters).named_parameters()
    is_generator = isinstance(parameters, types.GeneratorType)
    try:
        # A list is read as it is, not copied (a reference per item: ~10 us at 4,500).
        items = parameters if type(parameters) is list else list(parameters)
    except TypeError:
        raise TypeError(
            "parameters must be a Tensor, an nn.Module or an iterable of tensors or of "
            f"(name, tensor) pairs, got {type(parameters).__name__}"
        ) from None
    if is_generator and not items and warn_empty_generator:
        # Same text as torch.nn.utils.clip_grad_norm_.
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=stacklevel + 1)
    if items and isinstance(items[0], tuple):
        return _split_named(items)
    # The common case, checked in C++ (csrc/host_path.cpp; dynamo cannot trace it) or on
    # the few distinct types (isinstance against torch.Tensor goes through its metaclass:
    # 3x the cost of type() per item); the loop finds a culprit.
    first_bad = None if torch.compiler.is_compiling() else native.first_non_tensor(items)
    if first_bad == -1 or (first_bad is None and all(
            issubclass(kind, torch.Tensor) for kind in set(map(type, items)))):
        return items, None
    for index, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"parameters[{index}] is a {type(item).__name__}, not a Tensor")
    return items, None


def _split_named(items: list) -> tuple[list[torch.Tensor], list[str]]:
    tensors, names = [], []
    for index, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(
                f"parameters[{index}] is {type(item).__name__}; a list that starts with "
                "(name, tensor) pairs must hold only such pairs"
            )
        names.append(str(item[0]))
        tensors.append(item[1])
    if len(set(names)) != len(names):
        # named_parameters() never repeats a name; a repeat would make errors and records
        # ambiguous (a record keeps one value per name).
        duplicate = next(name for name, count in collections.Counter(names).items() if count > 1)
        raise ValueError(f"parameter name {duplicate!r} appears more than once in `parameters`")
    return tensors, names


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` / DDP / DataParallel wrappers, so parameter
    names carry no ``_orig_mod.`` or ``module.`` prefix."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def gradients(
    params: list[torch.Tensor], names: list[str] | None
) -> tuple[list[torch.Tensor], list[str] | None]:
    """The non-``None`` gradients, and the names of their parameters."""
    if torch.compiler.is_compiling():  # dynamo traces neither attrgetter nor these maps
        kept = [i for i, p in enumerate(params) if p.grad is not None]
    else:
        # One C-speed read of every .grad and one C-speed None test: this runs every step.
        grads = list(map(_GRAD_OF, params))
        if all(map(operator.is_not, grads, itertools.repeat(None))):
            return grads, None if names is None else list(names)
        kept = [i for i, grad in enumerate(grads) if grad is not None]
    return [params[i].grad for i in kept], None if names is None else [names[i] for i in kept]


_GRAD_OF = operator.attrgetter("grad")


def norm_result_dtype(tensors: list[torch.Tensor], dtypes=None) -> torch.dtype:
    """The dtype torch's ``get_total_norm`` returns: its per-tensor norms (real, in each
    tensor's dtype) promoted together by ``torch.stack``. ``dtypes``: the tensors' dtype
    set, when the caller knows it (then ``tensors`` is not read)."""
    dtypes = frozenset({t.dtype for t in tensors} if dtypes is None else dtypes)
    if torch.compiler.is_compiling():  # dynamo warns on a cache it cannot keep: trace the work
        return _promoted_real.__wrapped__(dtypes)
    return _promoted_real(dtypes)


@functools.lru_cache(maxsize=64)  # a process sees a handful of dtype sets
def _promoted_real(dtypes: frozenset) -> torch.dtype:
    reals = {_REAL_OF_COMPLEX.get(dtype, dtype) for dtype in dtypes}
    result = reals.pop()
    for dtype in reals:
        result = torch.promote_types(result, dtype)
    return result
