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


def python_loop_log2_stats(params, histogram: bool = True, num_bins: int = 64,
                           min_exp: int = -40) -> list:
    """Per parameter, what gradstats computes, the way a user writes it without gradstats:
    the norm, the count of NaN/Inf values and (``histogram``) a ``num_bins``-bin histc of
    log2|grad| over gradstats' default range. No ``.item()``: the results stay tensors."""
    rows = []
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad.detach()
        norm = torch.linalg.vector_norm(grad)
        nonfinite = grad.numel() - torch.isfinite(grad).sum()
        hist = None
        if histogram:
            log2 = torch.log2(grad.abs().float())
            hist = torch.histc(log2, bins=num_bins, min=min_exp, max=min_exp + num_bins)
        rows.append((norm, nonfinite, hist))
    return rows
