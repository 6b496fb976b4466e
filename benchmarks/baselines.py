"""What users run today: torch.nn.utils, and the per-parameter Python loops of monitoring."""
from __future__ import annotations

import torch

HISTC_BINS = 64  # wandb.watch's histogram size


def python_loop_stats(params) -> list[tuple[float, bool]]:
    """Per parameter: ``grad.norm().item()`` and ``isfinite().all()`` (two host syncs each)."""
    return [(p.grad.norm().item(), bool(torch.isfinite(p.grad).all()))
            for p in params if p.grad is not None]


def python_loop_stats_with_histogram(params) -> list:
    """As wandb.watch logs gradients: norm, finiteness, min/max and a 64-bin histc per tensor."""
    rows = []
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad.detach().float()
        finite = bool(torch.isfinite(grad).all())
        low, high = grad.min().item(), grad.max().item()
        hist = torch.histc(grad, bins=HISTC_BINS, min=low, max=high).cpu()
        rows.append((grad.norm().item(), finite, hist))
    return rows
