"""Sharded gradients: local tensors for the fused pass, partials reduced across ranks.

The fused pass yields, per tensor, partials that add up across shards: the power
(``sum |x|^p``; ``max |x|`` for the inf-norm), the NaN/Inf count, the histogram and the
element count. So a sharded gradient is read where it lives (its local shard) and only
those small per-tensor rows cross the network, by ``torch.distributed`` collectives:

- a ``DTensor`` gradient is summed over exactly the mesh dimensions on which it is
  ``Shard``-ed; ``Replicate`` dimensions hold copies, which are not added (every element
  counts once). Gradients with the same (process group) share one collective: one
  ``all_reduce(SUM)`` of one float64 vector per mesh dimension, whatever the number of
  tensors, plus one ``all_reduce(MAX)`` for the inf-norm's powers. Float64 holds every
  count exactly below 2^53. Gradients on several meshes (pipeline stages, expert
  parallelism) are reduced over their own mesh each, then combined on the rank.
  ``Partial`` gradients (rare: FSDP2 and DDP hand out reduced ones) are made
  ``Replicate`` for the statistics; they are scaled in place as they are, since scaling
  every partial scales their sum;
- plain tensors with a ``process_group`` (hand-sharded, ZeRO-style flat buffers) are
  summed over that group;
- plain tensors without one (DDP, whose gradients are identical after its all-reduce)
  need no communication: no layout is made and nothing here runs.

Every rank ends with the same global figures, so decisions taken on them (raise on
NaN/Inf, skip a step, the clip coefficient) agree on all ranks. An empty local shard adds
nothing (an inf-norm of an empty shard is 0 here; torch raises).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from .norms import NormKind, norm_kind

__all__ = ["ShardedLayout", "local_view", "reduce_partials", "as_total", "plain_total"]


def _dtensor_class():
    """``DTensor``, when some code imported it; a program that made a DTensor has."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


@dataclass
class ShardedLayout:
    """How one call's gradients are spread over ranks.

    Attributes:
        tensors: the local tensors the statistics are computed on.
        targets: the local tensors to scale in place (``tensors``, except for ``Partial``
            gradients, whose statistics come from a replicated copy).
        reductions: ``(process group, rows)`` in the order every rank issues them: the
            rows (positions in ``tensors``) whose partials are summed over that group.
        mesh: the first ``DTensor`` gradient's mesh (the total norm is returned as a
            ``DTensor`` on it, as torch does), or None.
    """

    tensors: list[torch.Tensor]
    targets: list[torch.Tensor]
    reductions: list[tuple[object, list[int]]] = field(default_factory=list)
    mesh: object | None = None


def local_view(grads: list[torch.Tensor], process_group=None) -> ShardedLayout | None:
    """The local tensors of ``grads`` and how to combine their partials, or None when
    there is nothing to combine (plain tensors and no ``process_group``): the caller goes
    on with ``grads`` as they are."""
    dtensor = _dtensor_class()
    if process_group is None and (dtensor is None or not any(
            issubclass(kind, dtensor) for kind in set(map(type, grads)))):
        return None
    if process_group is not None:
        _check_process_group(process_group)
    tensors, targets, mesh = [], [], None
    rows_by_group: dict[object, list[int]] = {}
    for row, grad in enumerate(grads):
        if dtensor is None or not isinstance(grad, dtensor):
            tensors.append(grad)
            targets.append(grad)
            if process_group is not None:
                rows_by_group.setdefault(process_group, []).append(row)
            continue
        grad_mesh, placements = grad.device_mesh, grad.placements
        mesh = grad_mesh if mesh is None else mesh
        local = grad.to_local()
        targets.append(local)
        if any(placement.is_partial() for placement in placements):
            tensors.append(_replicated_partials(grad).to_local())
        else:
            tensors.append(local)
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                rows_by_group.setdefault(grad_mesh.get_group(dim), []).append(row)
    return ShardedLayout(tensors, targets, list(rows_by_group.items()), mesh)


def _check_process_group(process_group) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialized")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")


def _replicated_partials(grad):
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if placement.is_partial() else placement
                  for placement in grad.placements]
    return grad.redistribute(grad.device_mesh, placements)


def check_norm_type(layout: ShardedLayout | None, p: float) -> None:
    if layout is not None and norm_kind(p) == NormKind.COMPOSED:
        raise ValueError(
            f"norm_type {p} has no partials that add up across shards; sharded gradients "
            "(DTensor or process_group=) take norm_type > 0 or 'inf'")


def reduce_partials(
    layout: ShardedLayout,
    p: float,
    power: torch.Tensor,
    nonfinite: torch.Tensor,
    hist: torch.Tensor,
    numel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-tensor partials summed (max-ed: inf-norm powers) over each reduction's
    group: the global figures, the same on every rank. Inputs are not modified."""
    if not layout.reductions:
        return power, nonfinite, hist, numel
    import torch.distributed as dist

    inf_norm = norm_kind(p) == NormKind.INF
    power, nonfinite, hist = power.clone(), nonfinite.clone(), hist.clone()
    numel = None if numel is None else numel.clone()
    bins = hist.shape[1]
    for group, rows in layout.reductions:
        index = torch.tensor(rows, dtype=torch.int64).to(power.device, non_blocking=True)
        columns = [nonfinite.index_select(0, index).unsqueeze(1).to(torch.float64),
                   hist.index_select(0, index).to(torch.float64)]
        if numel is not None:
            columns.append(numel.index_select(0, index).unsqueeze(1).to(torch.float64))
        row_power = power.index_select(0, index)
        # The sum of powers goes with the counts; the inf-norm's maxima need their own
        # MAX collective, and a NaN flag in the sum, since MAX need not keep a NaN.
        columns.insert(0, (torch.isnan(row_power) if inf_norm else row_power)
                       .to(torch.float64).unsqueeze(1))
        packed = torch.cat(columns, dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        if inf_norm:
            maxima = row_power.contiguous()
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
            row_power = torch.where(packed[:, 0] > 0, torch.nan, maxima)
        else:
            row_power = packed[:, 0]
        power.index_copy_(0, index, row_power)
        nonfinite.index_copy_(0, index, packed[:, 1].round().to(torch.int64))
        hist.index_copy_(0, index, packed[:, 2:2 + bins].round().to(torch.int64))
        if numel is not None:
            numel.index_copy_(0, index, packed[:, 2 + bins].round().to(torch.int64))
    return power, nonfinite, hist, numel


def as_total(total: torch.Tensor, layout: ShardedLayout | None):
    """The total norm as torch returns it: a ``DTensor`` replicated over the first
    ``DTensor`` gradient's mesh, when there is one (its value is the global norm on every
    rank: ``.full_tensor()`` and ``.to_local()`` both give it, with no communication)."""
    if layout is None or layout.mesh is None:
        return total
    from torch.distributed.tensor import DTensor, Replicate

    mesh = layout.mesh
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def plain_total(total_norm):
    """A ``DTensor`` total norm (torch's: ``Partial(max)`` for the inf-norm) as the plain
    tensor of its global value; anything else as it is."""
    return total_norm.full_tensor() if is_dtensor(total_norm) else total_norm
