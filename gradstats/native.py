"""The native C++ layer (``csrc/`` -> ``gradstats._C``): whether it loaded, and why not.

Importing ``gradstats._C`` registers ``gradstats::cpu_stats``, ``gradstats::cpu_scale_``
and ``gradstats::cpu_clamp_`` with the dispatcher; its Python functions are the host
path's (``csrc/host_path.cpp``: gradients, routing facts and plan keys from one walk over a
list of tensors). It is built at install time when torch and a C++ compiler are present
(see setup.py); without it the CPU path uses the PyTorch reference and the host path runs
in Python. The import is tried once, on first use, and its outcome kept.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import launch_config

# Must equal CHUNK in csrc/cpu_stats.cpp: the native pass and the reference sum per chunk.
NATIVE_CHUNK = 16384


# The direct calls (csrc/direct_calls.cpp) this Python code calls on the extension.
_DIRECT_CALLS = ("cpu_stats_list", "numel_list", "bump_versions", "new_tensors",
                 "cpu_stats_listed", "listing_numel")


@functools.lru_cache(maxsize=1)
def _load() -> str | None:
    """None when the extension loaded and its op is registered; otherwise why not."""
    try:
        from . import _C
    except ImportError as error:
        return f"gradstats._C not built: {error}"
    if launch_config.INTERPRETER_CONFIG.chunk != NATIVE_CHUNK:
        return "gradstats._C chunks differ from launch_config.INTERPRETER_CONFIG.chunk"
    missing = [name for name in _DIRECT_CALLS if not hasattr(_C, name)]
    if missing:  # a build left in place from an older source tree
        return (f"gradstats._C is out of date (no {', '.join(missing)}): rebuild it "
                "(make test, or python setup.py build_ext --inplace)")
    _register_fake()
    return None


def available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    """Why the native layer cannot be used; None when it can."""
    return _load()


def _register_fake() -> None:
    @torch.library.register_fake("gradstats::cpu_stats")
    def _(grads, p, norm_kind, num_bins, min_exp):
        n = len(grads)
        devices = {g.device for g in grads}
        # Shapes only, on the inputs' device (meta under tracing, cpu under fake tensors).
        torch._check(len(devices) <= 1, lambda: "gradstats::cpu_stats: one device")
        device = devices.pop() if devices else torch.device("cpu")
        return (
            torch.empty(n, dtype=torch.float64, device=device),
            torch.empty(n, dtype=torch.int64, device=device),
            torch.empty(n, num_bins, dtype=torch.int64, device=device),
        )

    # The in-place updates return nothing: there is no output to describe.
    torch.library.register_fake("gradstats::cpu_scale_")(lambda tensors, coef: None)
    torch.library.register_fake("gradstats::cpu_clamp_")(lambda tensors, lo, hi: None)


def cpu_stats(tensors: list[torch.Tensor], p: float, kind: int, num_bins: int,
              min_exp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gradstats::cpu_stats`` on contiguous CPU float32/64, bfloat16, float16 tensors."""
    _require()
    return torch.ops.gradstats.cpu_stats(tensors, p, int(kind), num_bins, min_exp)


def cpu_stats_direct(
    tensors: list[torch.Tensor], p: float, kind: int, num_bins: int, min_exp: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """What :func:`cpu_stats` returns, computed without the dispatcher, for eager calls on
    a list of plain CPU tensors; None where the op must run instead (a tensor subclass, a
    mode, another device, tracing: see csrc/direct_calls.cpp). Its outputs need no detach:
    they are new tensors, and no autograd graph is recorded for them. The dispatcher's
    boxed call costs ~150 ns per tensor (0.6 ms at 4,500 gradients)."""
    # Before _load: dynamo traces into its lru_cache, and on to register_fake, which it
    # refuses to trace.
    if torch.compiler.is_compiling():  # traced code calls the op
        return None
    _require()
    return _extension().cpu_stats_list(tensors, float(p), int(kind), num_bins, min_exp)


def cpu_stats_listed(
    listing, tensors: list[torch.Tensor], p: float, kind: int, num_bins: int, min_exp: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """What :func:`cpu_stats_direct` returns for ``tensors``, planned from ``listing``
    (:attr:`HostFacts.cpu_listing` of the walk that returned ``tensors``) instead of from
    the tensors again; None when the listing does not serve them (another or a changed
    list) or a mode is in force."""
    if torch.compiler.is_compiling():
        return None
    return _extension().cpu_stats_listed(listing, tensors, float(p), int(kind), num_bins,
                                         min_exp)


def numel_tensor(tensors: list[torch.Tensor], listing=None) -> torch.Tensor | None:
    """The element counts of a list of plain CPU tensors as an int64 tensor, read in C++
    (a Python call per tensor cost 0.3 ms at 4,500 gradients), or from ``listing`` (see
    :func:`cpu_stats_listed`) when it serves them; None when the native layer is missing
    or the list holds anything else."""
    if torch.compiler.is_compiling() or _load() is not None:  # (the order: see above)
        return None
    if listing is not None:
        numel = _extension().listing_numel(listing, tensors)
        if numel is not None:
            return numel
    return _extension().numel_list(tensors)


def bump_versions(tensors: list[torch.Tensor]) -> bool:
    """Bumps each tensor's version counter (as an in-place torch op would) in C++; False,
    doing nothing, without the native layer or when some item is not a tensor."""
    if torch.compiler.is_compiling() or _load() is not None:
        return False
    return _extension().bump_versions(tensors) is not None


# (shape, dtype, zeroed): one tensor new_tensors makes.
TensorSpec = tuple[tuple[int, ...], torch.dtype, bool]


def new_tensors(device: torch.device, specs: tuple[TensorSpec, ...]) -> tuple[torch.Tensor, ...]:
    """New tensors on ``device``, one per spec: zeros where ``zeroed``, else uninitialised.
    In one C++ call where the native layer serves (outside ``torch.compile`` and torch
    function modes), each ``torch.empty`` from Python costing 1.2-2 us; else torch's."""
    if not torch.compiler.is_compiling() and _load() is None:
        made = _extension().new_tensors(device, specs)
        if made is not None:
            return made
    return tuple((torch.zeros if zeroed else torch.empty)(shape, dtype=dtype, device=device)
                 for shape, dtype, zeroed in specs)


@functools.cache
def _extension():
    """``gradstats._C``, once :func:`_load` found it (kept: an import statement per call
    costs ~1.4 us)."""
    from . import _C

    return _C


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"gradstats: the native CPU layer is not available: {reason}")


def cpu_scale_(tensors: list[torch.Tensor], clip_coef: torch.Tensor) -> None:
    """``gradstats::cpu_scale_``: ``t *= clip_coef`` in place, torch's bits, nothing read or
    written when the coefficient is >= 1. CPU float32/64, bfloat16, float16 tensors that are
    contiguous or dense permuted; ``clip_coef`` one floating-point element on the CPU."""
    _require()
    torch.ops.gradstats.cpu_scale_(tensors, clip_coef)


def cpu_clamp_(tensors: list[torch.Tensor], lo: float, hi: float) -> None:
    """``gradstats::cpu_clamp_``: ``t.clamp_(lo, hi)`` in place, torch's bits, on the
    tensors :func:`cpu_scale_` takes."""
    _require()
    torch.ops.gradstats.cpu_clamp_(tensors, lo, hi)


@functools.lru_cache(maxsize=1)
def _host_path_module():
    """``gradstats._C`` when it loaded and holds the host path's functions, else None."""
    if _load() is not None:
        return None
    from . import _C

    return _C if hasattr(_C, "host_pass") and hasattr(_C, "first_non_tensor") else None


def host_path_available() -> bool:
    """Whether the native host path runs (the switch tests turn off to take the Python one)."""
    return _host_path_module() is not None


class HostFacts(NamedTuple):
    """What one native walk found (csrc/host_path.cpp, ``host_pass``)."""

    tensors: list  # the items, or their non-None gradients, in order
    kept: list[int] | None  # positions in items of ``tensors``; None: every item gave one
    device: torch.device | None  # the first tensor's (None when there is none)
    dtypes: frozenset  # of torch.dtype
    flags: int  # bits: dispatch._SINGLE_DEVICE, dispatch._ALL_CONTIGUOUS
    key_hash: int  # a 64-bit hash of key_bytes' metadata
    key_bytes: bytes  # the exact plan key (layout in csrc/host_path.cpp)
    # With list_for_cpu_pass: the tensors as the CPU statistics pass reads them (an opaque
    # capsule, csrc/cpu_listing.h), when it reads every one; else None.
    cpu_listing: object


def host_pass(items: list | tuple, take_grad: bool,
              list_for_cpu_pass: bool = False) -> HostFacts | None:
    """One native walk over ``items`` (tensors, or parameters when ``take_grad``), or None
    when the native host path is off or cannot describe ``items`` (a tensor subclass, a
    torch function mode, an unusual layout): the Python path runs then.
    ``list_for_cpu_pass``: also list the tensors for the native CPU statistics pass (for
    callers about to run it: the listing holds every tensor's storage until dropped)."""
    if not host_path_available():
        return None
    facts = _host_path_module().host_pass(items, take_grad, list_for_cpu_pass)
    return None if facts is None else HostFacts._make(facts)


def first_non_tensor(items: list | tuple) -> int | None:
    """The index of the first item of ``items`` that is not a tensor, -1 when all are;
    None when the native host path is off."""
    if not host_path_available():
        return None
    return _host_path_module().first_non_tensor(items)
