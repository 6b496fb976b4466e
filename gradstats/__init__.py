"""gradstats: fused gradient statistics and drop-in gradient clipping for PyTorch.

Importing gradstats neither initialises CUDA nor imports triton; the kernels load on
first use.
"""
from __future__ import annotations

from . import ops as _ops  # noqa: F401  (registers the gradstats:: operators)
from .backend import backend_info
from .clip import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    fused_clip_grad_norm_,
    get_total_norm,
)
from .ddp_hook import DDPStatsHook
from .device_cache import release_captured_plans
from .diagnose import Diagnosis, diagnose
from .logs import read_jsonl, records_to_rows
from .monitor import GradMonitor
from .nonfinite import NonFiniteGradientWarning
from .record import StepRecord
from .routing import ClipRouting, route_torch_clipping
from .stats import GradStats, grad_stats

__version__ = "0.1.0"

__all__ = [
    "ClipRouting",
    "DDPStatsHook",
    "Diagnosis",
    "GradMonitor",
    "GradStats",
    "NonFiniteGradientWarning",
    "StepRecord",
    "backend_info",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "diagnose",
    "fused_clip_grad_norm_",
    "get_total_norm",
    "grad_stats",
    "read_jsonl",
    "records_to_rows",
    "release_captured_plans",
    "route_torch_clipping",
]
