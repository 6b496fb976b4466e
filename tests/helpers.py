"""Shared by the tests: independent float64 references (NumPy), dtype-aware tolerances,
parameters made from given gradients, and a dispatch mode that records the ops it sees."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FUSED_NORM_TYPES = [0.5, 1.0, 2.0, 3.5, math.inf]
COMPOSED_NORM_TYPES = [0.0, -1.0, -math.inf]


def as_float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).reshape(-1).numpy()


def np_power(values: np.ndarray, p: float) -> float:
    magnitude = np.abs(values)
    if p == math.inf:
        if magnitude.size == 0:
            return 0.0
        return float("nan") if np.isnan(magnitude).any() else float(magnitude.max())
    return float(np.sum(magnitude ** p))


def np_norm(values: np.ndarray, p: float) -> float:
    power = np_power(values, p)
    return power if p == math.inf else power ** (1.0 / p)


def np_total_norm(arrays: list[np.ndarray], p: float) -> float:
    powers = [np_power(a, p) for a in arrays]
    if p == math.inf:
        return float("nan") if any(math.isnan(x) for x in powers) else max(powers, default=0.0)
    return sum(powers) ** (1.0 / p)


def np_histogram(values: np.ndarray, num_bins: int, min_exp: int) -> np.ndarray:
    magnitude = np.abs(values[np.isfinite(values)])
    counts = np.zeros(num_bins, dtype=np.int64)
    counts[0] = int(np.sum(magnitude == 0))
    nonzero = magnitude[magnitude != 0]
    _, exponent = np.frexp(nonzero)  # exact, also for subnormals
    columns = np.clip(exponent.astype(np.int64) - 1 - min_exp + 1, 1, num_bins - 1)
    np.add.at(counts, columns, 1)
    return counts


def norm_rtol(grad_dtype: torch.dtype, p: float, device: torch.device) -> float:
    """How close our float32 (float64) norms must be to the float64 reference."""
    if grad_dtype == torch.float64:
        return 1e-10
    # fp32 accumulation; exp2/log2 for general p are approximate on GPUs.
    if p in (1.0, 2.0, math.inf):
        return 2e-5
    return 2e-4 if device.type == "cuda" else 2e-5


def torch_rtol(dtype: torch.dtype) -> float:
    """How close a result in ``dtype`` must be to torch's own result in ``dtype``: torch rounds
    per-tensor norms to the gradient dtype before combining them, we do not."""
    return {torch.float32: 1e-5, torch.float64: 1e-10,
            torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


def make_grads(sizes, dtype, device, scale=1.0) -> list[torch.Tensor]:
    return [(torch.randn(n, dtype=torch.float64) * scale).to(dtype).to(device) for n in sizes]


def make_params(sizes, dtype, device, scale=1.0) -> list[torch.nn.Parameter]:
    params = []
    for grad in make_grads(sizes, dtype, device, scale):
        param = torch.nn.Parameter(torch.zeros_like(grad))
        param.grad = grad
        params.append(param)
    return params


def clone_params(params) -> list[torch.nn.Parameter]:
    clones = []
    for param in params:
        clone = torch.nn.Parameter(param.detach().clone())
        clone.grad = None if param.grad is None else param.grad.clone()
        clones.append(clone)
    return clones


def with_grads(grads) -> list[torch.nn.Parameter]:
    """Parameters whose ``.grad`` are exactly ``grads`` (same storage, same strides)."""
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device))
        param.grad = grad
        params.append(param)
    return params


def count_plan_key_builds(monkeypatch) -> list[int]:
    """Patches the dispatcher's plan-key builder to record the list length of each build.
    The Python host path's builder: the native host path (which builds its key in C++,
    tests/test_host_path.py) is switched off."""
    from gradstats import dispatch, native

    monkeypatch.setattr(native, "host_path_available", lambda: False)

    builds = []
    real = dispatch.plan_key

    def counting(tensors, device):
        builds.append(len(tensors))
        return real(tensors, device)
    monkeypatch.setattr(dispatch, "plan_key", counting)
    return builds


class RecordingMode(TorchDispatchMode):
    """A dispatch mode that records the name of every op it sees and runs it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
