"""The native C++ layer (``csrc/`` -> ``gradstats._C``): whether it loaded, and why not.

Importing ``gradstats._C`` registers ``gradstats::cpu_stats``, ``gradstats::cpu_scale_``
and ``gradstats::cpu_clamp_`` with the dispatcher (the library has no Python functions).
It is built at install time when torch and a C++ compiler are present (see setup.py);
without it the CPU path uses the PyTorch reference.
The import is tried once, on first use, and its outcome kept.
"""
from __future__ import annotations

import functools

import torch

from . import launch_config

# Must equal CHUNK in csrc/cpu_stats.cpp: the native pass and the reference sum per chunk.
NATIVE_CHUNK = 16384


@functools.lru_cache(maxsize=1)
def _load() -> str | None:
    """None when the extension loaded and its op is registered; otherwise why not."""
    try:
        from . import _C  # noqa: F401
    except ImportError as error:
        return f"gradstats._C not built: {error}"
    if launch_config.INTERPRETER_CONFIG.chunk != NATIVE_CHUNK:
        return "gradstats._C chunks differ from launch_config.INTERPRETER_CONFIG.chunk"
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
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"gradstats: the native CPU layer is not available: {reason}")
    return torch.ops.gradstats.cpu_stats(tensors, p, int(kind), num_bins, min_exp)


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
