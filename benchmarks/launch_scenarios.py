"""Calls of gradstats' public API that, between them, reach every kernel specialization the
dispatch code can launch.

Nothing here names a kernel or a constexpr: the scenarios vary what a user can vary (dtype,
alignment, norm type, histogram on/off and its range, the clip functions, mixed and tied
lists, the monitor), and the JIT derives the specializations from the real arguments. A new
constexpr that follows one of these inputs is covered without editing this file; a new
kernel that no scenario reaches is caught by the gate's coverage check.

The histogram's user-chosen constexprs (``num_bins``, ``min_exp``) take the defaults plus the
extremes :mod:`gradstats.checks` allows, read from there.
"""
from __future__ import annotations

import math
import tempfile
from typing import Callable, Iterator

import torch

import gradstats
from gradstats import checks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
# Tiny (one masked tail), one full block, several chunks with a tail, 2-d, 3-d.
SHAPES = [(33,), (4096,), (70001,), (128, 64), (3, 5, 7)]
# p: the 2-, 1- and inf-norms, a general p (log2/exp2 path) and p=0 (torch composes it).
NORM_TYPES = (2.0, 1.0, math.inf, 3.0, 0.0)


def make_params(dtype: torch.dtype, aligned: bool = True,
                shapes=SHAPES) -> list[torch.nn.Parameter]:
    """Parameters with gradients. ``aligned=False``: every gradient is a view into one flat
    buffer at an odd element offset, so no gradient starts 16-byte aligned."""
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
    if aligned:
        for param in params:
            param.grad = torch.randn(param.shape).to(dtype)
        return params
    flat = torch.randn(sum(p.numel() + 1 for p in params) + 1).to(dtype)
    offset = 1
    for param in params:
        param.grad = flat[offset:offset + param.numel()].view(param.shape)
        offset += param.numel() + 1
    return params


def _monitor_steps(dtype: torch.dtype) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).to(dtype)
    model(torch.randn(4, 64, dtype=dtype)).sum().backward()
    with tempfile.TemporaryDirectory() as folder:
        monitor = gradstats.GradMonitor(model, hist_every=2, sinks=[f"jsonl:{folder}/g.jsonl"],
                                        on_nonfinite=lambda step, counts: None)
        for _ in range(3):
            monitor.step(max_norm=1.0)
        monitor.close()


def _per_dtype(name: str, dtype: torch.dtype, aligned: bool) -> Iterator[tuple[str, Callable]]:
    tag = f"{name}/{'aligned' if aligned else 'unaligned'}"

    def params():
        return make_params(dtype, aligned)

    for p in NORM_TYPES:
        for histogram in (False, True):
            yield (f"grad_stats {tag} p={p} histogram={histogram}",
                   lambda p=p, h=histogram: gradstats.grad_stats(params(), p, max_norm=1.0,
                                                                 histogram=h))
    low_exp = checks.MIN_EXP_RANGE[0]  # reaches below every dtype's subnormals
    yield (f"grad_stats {tag} min_exp={low_exp}",
           lambda: gradstats.grad_stats(params(), min_exp=low_exp))
    for bins in (2, checks.MAX_BINS):
        yield (f"grad_stats {tag} num_bins={bins}",
               lambda bins=bins: gradstats.grad_stats(params(), num_bins=bins))
    for p in NORM_TYPES:
        yield (f"fused_clip_grad_norm_ {tag} p={p}",
               lambda p=p: gradstats.fused_clip_grad_norm_(params(), 1e-3, p))
    yield f"clip_grad_norm_ {tag}", lambda: gradstats.clip_grad_norm_(params(), 1e-3)
    yield (f"get_total_norm {tag}",
           lambda: gradstats.get_total_norm([p.grad for p in params()]))
    for total_dtype in (torch.float32, torch.float64):
        yield (f"clip_grads_with_norm_ {tag} total {total_dtype}",
               lambda t=total_dtype: gradstats.clip_grads_with_norm_(
                   params(), 1.0, torch.tensor(5.0, dtype=t)))
    yield f"clip_grad_value_ {tag}", lambda: gradstats.clip_grad_value_(params(), 0.1)
    yield (f"fused_clip_grad_norm_ {tag} one tensor",
           lambda: gradstats.fused_clip_grad_norm_(make_params(dtype, aligned, [(4096,)]), 1e-3))


def scenarios() -> Iterator[tuple[str, Callable[[], object]]]:
    """(name, call) pairs; each call runs gradstats on fresh CPU tensors."""
    for name, dtype in DTYPES.items():
        for aligned in (True, False):
            yield from _per_dtype(name, dtype, aligned)

    def mixed():
        return (make_params(torch.float32) + make_params(torch.bfloat16, aligned=False)
                + make_params(torch.float64) + make_params(torch.float16))

    yield ("fused_clip_grad_norm_ mixed dtypes",
           lambda: gradstats.fused_clip_grad_norm_(mixed(), 1e-3))
    yield "grad_stats mixed dtypes", lambda: gradstats.grad_stats(mixed(), max_norm=1.0)
    yield "clip_grad_value_ mixed dtypes", lambda: gradstats.clip_grad_value_(mixed(), 0.1)

    def tied():
        params = make_params(torch.float32)
        return gradstats.fused_clip_grad_norm_(params + params[:2], 1e-3)

    yield "fused_clip_grad_norm_ tied tensors", tied
    for name, dtype in DTYPES.items():
        yield f"GradMonitor 3 steps {name}", lambda dtype=dtype: _monitor_steps(dtype)


# Only what the instruction-count table needs: default histogram. Aligned gradients only:
# unaligned ones run the same kernels (the gate checks that).
def hot_loop_scenarios() -> Iterator[tuple[str, Callable[[], object]]]:
    for name, dtype in DTYPES.items():
        for histogram in (False, True):
            yield (f"grad_stats {name} L2 histogram={histogram}",
                   lambda d=dtype, h=histogram: gradstats.grad_stats(make_params(d), histogram=h))
    for p in (math.inf, 1.0, 3.0):
        yield (f"grad_stats fp32 p={p}",
               lambda p=p: gradstats.grad_stats(make_params(torch.float32), p, histogram=False))
    for name, dtype in DTYPES.items():
        yield (f"fused_clip_grad_norm_ {name}",
               lambda d=dtype: gradstats.fused_clip_grad_norm_(make_params(d), 1e-3))
        yield (f"clip_grad_value_ {name}",
               lambda d=dtype: gradstats.clip_grad_value_(make_params(d), 0.1))
