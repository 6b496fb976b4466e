"""Route ``torch.nn.utils``' clipping functions to gradstats, for code that calls torch's.

Training loops that call ``torch.nn.utils.clip_grad_norm_`` themselves look the function up
on the module at call time: timm (``timm.utils.dispatch_clip_grad``, used by
``NativeScaler``), nanoGPT's ``train.py``, Lightning's precision plugins
(``clip_grad_by_norm``/``clip_grad_by_value``), Fabric's ``Strategy.clip_gradients_norm``,
accelerate's ``Accelerator.clip_grad_norm_`` (and so the Hugging Face Trainer). Replacing the
module attributes reaches all of them without touching their code, as Liger-Kernel's
``apply_liger_kernel_to_*`` does for model code. Code that bound the function earlier
(``from torch.nn.utils import clip_grad_norm_`` executed before routing) keeps torch's.

Plain tensors are served, and ``DTensor`` s (FSDP2, tensor parallelism: their local shards
are read and the partials combined across ranks, see :mod:`gradstats.distributed`). Anything
else goes to the function that was there before routing, with the same (already
materialised) arguments: a gradient (or tensor) of any other ``torch.Tensor`` subclass, a
list mixing ``DTensor`` and plain tensors (torch refuses it with its own error), and
``DTensor`` gradients of ``clip_grad_value_`` (gradstats clamps plain tensors only).
"""
from __future__ import annotations

import functools
import threading
import types
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import clip as _clip
from . import distributed

__all__ = ["route_torch_clipping", "ClipRouting"]

# The modules whose attributes clients look up. The deprecated ``clip_grad_norm`` is left in
# place: it calls ``clip_grad_norm_`` through ``torch.nn.utils.clip_grad``'s globals at call
# time, so it is routed with it (and keeps its own deprecation warning).
_MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
_NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
# Plain tensors: what gradstats' kernels and reference path serve.
_PLAIN_TYPES = frozenset({torch.Tensor, nn.Parameter})

_lock = threading.Lock()
# The routing in force: its saved originals and how many handles hold it. Patching torch
# is process-wide by nature; this records what to restore when the last handle lets go.
_active: _Routing | None = None


class _Routing:
    """One installation: the routed functions, and what each module attribute held before."""

    def __init__(self):
        # Those this torch has (get_total_norm and clip_grads_with_norm_ came in 2.6); what
        # torch.nn.utils holds is what tensors gradstats does not serve go to.
        originals = {name: getattr(torch.nn.utils, name)
                     for name in _NAMES if hasattr(torch.nn.utils, name)}
        self.routed = {name: _ROUTERS[name](original) for name, original in originals.items()}
        self.saved = {(module, name): getattr(module, name)
                      for module in _MODULES for name in self.routed if hasattr(module, name)}
        self.holders = 0

    def install(self) -> None:
        for module, name in self.saved:
            setattr(module, name, self.routed[name])

    def uninstall(self) -> None:
        for (module, name), previous in self.saved.items():
            if getattr(module, name) is self.routed[name]:
                setattr(module, name, previous)
            else:
                warnings.warn(f"gradstats: {module.__name__}.{name} was replaced by something "
                              "else while routed to gradstats; leaving that in place",
                              RuntimeWarning, stacklevel=3)


class ClipRouting:
    """What :func:`route_torch_clipping` returns: :meth:`undo` it, or use it as a context
    manager. Each handle undoes once; torch's functions come back when every handle is undone."""

    def __init__(self):
        self._undone = False

    @property
    def active(self) -> bool:
        return not self._undone

    def undo(self) -> None:
        """Stop routing (once every other handle is undone too). Safe to call twice."""
        global _active
        with _lock:
            if self._undone:
                return
            self._undone = True
            _active.holders -= 1
            if _active.holders == 0:
                _active.uninstall()
                _active = None

    def __enter__(self) -> ClipRouting:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()


def route_torch_clipping() -> ClipRouting:
    r"""Make ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
    ``clip_grads_with_norm_`` (in ``torch.nn.utils`` and ``torch.nn.utils.clip_grad``) run
    gradstats' fused drop-ins, until undone.

    Arguments are handled as torch handles them (a tensor, a list or a generator, which is
    materialised once; keywords; ``error_if_nonfinite``; ``foreach``, which gradstats
    ignores), and results are torch's (the total norm, gradients clipped in place), within
    float32 rounding. ``DTensor`` gradients (FSDP2, tensor parallelism) are served too, with
    a ``DTensor`` total as torch returns; other tensor subclasses, lists mixing ``DTensor``
    and plain tensors, and ``clip_grad_value_`` on ``DTensor`` gradients go to the function
    that was there before. Routing again while routed adds a holder and changes nothing
    else: calls never pass through gradstats twice.

    Returns:
        ClipRouting: ``undo()`` restores what the attributes held before the first routing,
        once every handle is undone; also a context manager.

    Example::

        >>> handle = gradstats.route_torch_clipping()
        >>> trainer.fit(model)          # Lightning's gradient_clip_val now clips in one pass
        >>> handle.undo()
        >>> with gradstats.route_torch_clipping():
        ...     train_one_epoch(model, loader, optimizer, loss_scaler=timm.utils.NativeScaler())
    """
    global _active
    with _lock:
        if _active is None:
            _active = _Routing()
            _active.install()
        _active.holders += 1
        return ClipRouting()


def _materialise(parameters, *, warn_empty_generator: bool = False):
    """A tensor or a list: a generator is read once here, so that whichever function runs
    gets every item."""
    if isinstance(parameters, torch.Tensor):
        return parameters
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = list(parameters)
    if warn_empty_generator and is_generator and not parameters:
        # torch's text; stacklevel 3 points at the client's call, as torch's does.
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return parameters


def _served(tensors, *, dtensors: bool = True) -> bool:
    """Whether gradstats serves ``tensors`` (a tensor or a list): all plain, or all
    ``DTensor`` when ``dtensors``. Checked on the few distinct types."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else tensors
    kinds = set(map(type, tensors))
    if kinds <= _PLAIN_TYPES:
        return True
    dtensor = distributed.dtensor_class()
    return dtensors and dtensor is not None and kinds == {dtensor}


def _grads_served(parameters, *, dtensors: bool = True) -> bool:
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    return _served([p.grad for p in parameters if p.grad is not None], dtensors=dtensors)


def _route_clip_grad_norm_(original: Callable) -> Callable:
    @functools.wraps(original)
    def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                        foreach=None):
        parameters = _materialise(parameters, warn_empty_generator=True)
        # Looked up at call time, so the function in gradstats.clip is the one that runs.
        target = _clip.fused_clip_grad_norm_ if _grads_served(parameters) else original
        return target(parameters, max_norm, norm_type=norm_type,
                      error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    return clip_grad_norm_


def _route_get_total_norm(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
        tensors = _materialise(tensors)
        target = _clip.get_total_norm if _served(tensors) else original
        return target(tensors, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite,
                      foreach=foreach)
    return get_total_norm


def _route_clip_grads_with_norm_(original: Callable) -> Callable:
    @functools.wraps(original)
    def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
        parameters = _materialise(parameters)
        # A DTensor total (torch's or gradstats') is read as its global value.
        served = _grads_served(parameters) and (not isinstance(total_norm, torch.Tensor)
                                                or _served(total_norm))
        target = _clip.clip_grads_with_norm_ if served else original
        return target(parameters, max_norm, total_norm, foreach=foreach)
    return clip_grads_with_norm_


def _route_clip_grad_value_(original: Callable) -> Callable:
    @functools.wraps(original)
    def clip_grad_value_(parameters, clip_value, foreach=None):
        parameters = _materialise(parameters)
        # DTensor gradients: gradstats' clamp runs on plain tensors only.
        target = (_clip.clip_grad_value_ if _grads_served(parameters, dtensors=False)
                  else original)
        return target(parameters, clip_value, foreach=foreach)
    return clip_grad_value_


_ROUTERS = {
    "clip_grad_norm_": _route_clip_grad_norm_,
    "clip_grad_value_": _route_clip_grad_value_,
    "get_total_norm": _route_get_total_norm,
    "clip_grads_with_norm_": _route_clip_grads_with_norm_,
}
