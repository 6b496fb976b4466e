"""Sharded gradients: local tensors for the fused pass, partials reduced across ranks.

The fused pass yields, per tensor, partials that add up across shards: the power
(``sum |x|^p``; ``max |x|`` for the inf-norm), the NaN/Inf count, the histogram and the
element count. Norm types without a fused power have such partials too, as torch's
``DTensor`` norms use them: the count of non-zeros (``p = 0``) and ``sum |x|^p``
(``p < 0``) add up, ``min |x|`` (``p = -inf``) takes the minimum; the total is then
composed as torch composes it (the ``p``-norm of the per-tensor norms). So a sharded
gradient is read where it lives (its local shard) and only those small per-tensor rows
cross the network, by ``torch.distributed`` collectives:

- a ``DTensor`` gradient is summed over exactly the mesh dimensions on which it is
  ``Shard``-ed; ``Replicate`` dimensions hold copies, which are not added (every element
  counts once). Gradients sharded over the same process group (mesh dimension) share
  one ``all_reduce(SUM)`` of one float64 vector, whatever the number of tensors; the
  inf-norm's maxima take one ``all_reduce(MAX)`` instead (the -inf-norm's minima too, as
  the maxima of their negatives), and its counts and histograms, when wanted, the SUM.
  Float64 holds every count exactly below 2^53. Gradients on several meshes (expert
  parallelism, several pipeline stages on one rank) are reduced over their own mesh
  each, then combined on the rank. ``Partial`` gradients (rare:
  FSDP2 hands out reduced ones) are made ``Replicate`` for the statistics; they are
  scaled in place as they are, since scaling every partial scales their sum;
- plain tensors with a ``process_group`` (hand-sharded, ZeRO-style flat buffers) are
  summed over that group;
- plain tensors without one (DDP, whose gradients are identical after its all-reduce)
  need no communication: no layout is made and nothing here runs.

Every rank ends with the same global figures, so decisions taken on them (raise on
NaN/Inf, skip a step, the clip coefficient) agree on all ranks. An empty local shard adds
nothing: 0 to the sums and counts, 0 to the inf-norm's maximum, +inf to the -inf-norm's
minimum. (torch raises on the rank holding an empty shard for the inf-, -inf- and p < 0
norms, "cannot compute the ... norm on an empty tensor", while the other ranks wait in
the collective until it times out.) A NaN on any shard makes that tensor's norm NaN
(``p = 0`` counts it as a non-zero, as torch does).
"""
from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["ShardedLayout", "local_view", "reduce_partials", "global_counts", "as_total",
           "plain_total"]


def dtensor_class():
    """``DTensor``, when some code imported it; a program that made a DTensor has."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor) -> bool:
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def any_dtensor(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` holds a ``DTensor`` (checked on the few distinct types)."""
    dtensor = dtensor_class()
    return dtensor is not None and any(issubclass(kind, dtensor)
                                       for kind in set(map(type, tensors)))


@dataclass
class ShardedLayout:
    """How one call's gradients are spread over ranks.

    Attributes:
        tensors: the local tensors the statistics are computed on.
        targets: the local tensors to scale in place (``tensors`` itself, except for
            ``Partial`` gradients, whose statistics come from a replicated copy).
        reductions: ``(process group, rows)`` in the order every rank issues them: the
            rows (positions in ``tensors``) whose partials are summed over that group.
        mesh: the first ``DTensor`` gradient's mesh (the total norm is returned as a
            ``DTensor`` on it, as torch does), or None.
        with_counts: reduce the NaN/Inf counts and histograms with the powers. Without
            them (the clipping functions, which only need the counts to name parameters
            in an error) the inf-norm takes one collective instead of two, and
            :func:`global_counts` reduces the counts once an error needs them.
        counts_are_local: set by :func:`reduce_partials` when it left the counts local.
    """

    tensors: list[torch.Tensor]
    targets: list[torch.Tensor]
    reductions: list[tuple[object, list[int]]] = field(default_factory=list)
    mesh: object | None = None
    with_counts: bool = True
    counts_are_local: bool = False


def local_view(
    grads: list[torch.Tensor], process_group=None, *, with_counts: bool = True,
    statistics: bool = True,
) -> ShardedLayout | None:
    """The local tensors of ``grads`` and how to combine their partials, or None when
    there is nothing to combine (plain tensors and no ``process_group``): the caller goes
    on with ``grads`` as they are. ``with_counts``: see :class:`ShardedLayout`.
    ``statistics=False``: only ``targets`` will be used (scaling by a given total), so
    ``Partial`` gradients get no replicated copy (a collective each).

    Every rank must pass the same gradients in the same order: rows are matched by
    position, and the collectives are issued per group in list order.
    """
    if process_group is None and not any_dtensor(grads):
        return None
    dtensor = dtensor_class()
    if process_group is None and not all(issubclass(kind, dtensor)
                                         for kind in set(map(type, grads))):
        # A plain tensor beside DTensors may hold different values on every rank (torch
        # refuses such a list too); its NaN/Inf would send one rank alone into a collective.
        raise ValueError(
            "gradients mix DTensor and plain tensors: make every gradient a DTensor, or "
            "pass process_group= for plain tensors sharded by hand")
    if process_group is not None:
        _check_process_group(process_group)
    tensors, targets, mesh, any_partial = [], [], None, False
    rows_by_group: dict[object, list[int]] = {}
    # (mesh, placements) -> (the groups of its Shard dims, any Partial): a few distinct
    # layouts serve hundreds of gradients, and asking each one costs ~10 us per gradient.
    layouts: dict[tuple, tuple[list, bool]] = {}
    _layouts_by_spec.check_world(_default_group())
    for row, grad in enumerate(grads):
        if dtensor is None or not isinstance(grad, dtensor):
            tensors.append(grad)
            targets.append(grad)
            if process_group is not None:
                rows_by_group.setdefault(process_group, []).append(row)
            continue
        mesh = grad.device_mesh if mesh is None else mesh
        groups, partial = _layouts_by_spec.get(grad, layouts)
        any_partial |= partial
        local = grad.to_local()  # under no_grad: the DTensor's own local tensor, no copy
        targets.append(local)
        tensors.append(_replicated_partials(grad).to_local() if partial and statistics
                       else local)
        for group in groups:
            rows_by_group.setdefault(group, []).append(row)
    if not any_partial:
        targets = tensors  # callers test `targets is tensors` to reuse the route
    return ShardedLayout(tensors, targets, list(rows_by_group.items()), mesh, with_counts)


class _LayoutsBySpec:
    """Each ``DTensor`` gradient's (groups of its ``Shard`` dims, any ``Partial``), kept
    across calls per ``DTensorSpec`` object: a lifetime-bound cache, as NeMo Automodel's
    distributed clipping keeps parameter metadata. FSDP2 builds every step's gradient of
    a parameter on that parameter's one spec object (``FSDPParam._sharding_spec``), so from
    the second step on a gradient's layout is one lookup by identity, where hashing its
    placements by value (a Python ``__hash__`` per placement) cost ~0.5 us per gradient,
    half of ``local_view``'s time at 148 gradients.

    An entry holds a weak reference to its spec and is used only while that spec lives (a
    new object may reuse a dead one's id). Process groups are resolved under the default
    group in force: a new one (``destroy_process_group``, then ``init_process_group``)
    empties the cache, as does growing past ``LIMIT`` entries."""

    LIMIT = 1 << 16

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, tuple[list, bool]]] = {}
        self._world = None

    def check_world(self, world) -> None:
        """Empties the cache when ``world`` (the default process group) is not the one
        its groups were resolved under."""
        if world is not self._world:
            self._entries.clear()
            self._world = world

    def get(self, grad, by_value: dict) -> tuple[list, bool]:
        """``grad``'s layout; ``by_value``: this call's layouts by (mesh, placements)."""
        spec = grad._spec  # DTensor's spec: its mesh and placements
        entry = self._entries.get(id(spec))
        if entry is not None and entry[0]() is spec:
            return entry[1]
        mesh, placements = spec.mesh, spec.placements
        key = (id(mesh), placements)
        layout = by_value.get(key)
        if layout is None:
            layout = by_value[key] = _groups_and_partial(mesh, placements)
        if len(self._entries) >= self.LIMIT:
            self._entries.clear()
        self._entries[id(spec)] = (weakref.ref(spec), layout)
        return layout


_layouts_by_spec = _LayoutsBySpec()


def _groups_and_partial(mesh, placements) -> tuple[list, bool]:
    # A dimension of size 1 (torchtitan's unused dp or pp) has nothing to add up.
    groups = [mesh.get_group(dim) for dim, placement in enumerate(placements)
              if placement.is_shard() and mesh.size(dim) > 1]
    return groups, any(placement.is_partial() for placement in placements)


def _default_group():
    import torch.distributed as dist

    return dist.group.WORLD


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


def reduce_partials(
    layout: ShardedLayout,
    p: float,
    power: torch.Tensor,
    nonfinite: torch.Tensor,
    hist: torch.Tensor,
    numel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-tensor partials summed over each reduction's group (the powers of the inf-
    and -inf-norms: their maximum and minimum): the global figures, the same on every
    rank. Inputs are not modified. ``power``: the fused powers, or for norm types 0, < 0
    and -inf the partials of :func:`gradstats.reference.composed_partials`.

    Per group, one ``all_reduce(SUM)`` of one float64 vector holding every row's power,
    counts, histogram and element count; the +-inf-norm's extremes take one
    ``all_reduce(MAX)`` instead of the power's place in it, and the SUM is left out when
    it would carry nothing (no counts wanted, no element counts)."""
    if not layout.reductions:
        return power, nonfinite, hist, numel
    extreme = p in (math.inf, -math.inf)
    with_counts = layout.with_counts
    layout.counts_are_local = not with_counts
    power = power.clone()
    if with_counts:
        nonfinite, hist = nonfinite.clone(), hist.clone()
    numel = None if numel is None else numel.clone()
    for group, rows in layout.reductions:
        index = _row_index(rows, power)
        columns = []  # what goes in the SUM vector
        if not extreme:
            columns.append(_rows(power, index).unsqueeze(1))
        if with_counts:
            columns.append(_rows(nonfinite, index).unsqueeze(1).to(torch.float64))
            columns.append(_rows(hist, index).to(torch.float64))
        if numel is not None:
            columns.append(_rows(numel, index).unsqueeze(1).to(torch.float64))
        if p == math.inf:
            _put_rows(power, index, _max_over(group, _rows(power, index)))
        elif p == -math.inf:  # the minima as the MAX of their negatives: NaN rides along
            _put_rows(power, index, -_max_over(group, -_rows(power, index)))
        if not columns:
            continue
        summed = _all_reduce(torch.cat(columns, dim=1), "SUM", group)
        if not extreme:
            _put_rows(power, index, summed[:, 0])
            summed = summed[:, 1:]
        if with_counts:
            _put_rows(nonfinite, index, _as_int64(summed[:, 0]))
            _put_rows(hist, index, _as_int64(summed[:, 1:1 + hist.shape[1]]))
        if numel is not None:
            _put_rows(numel, index, _as_int64(summed[:, -1]))
    return power, nonfinite, hist, numel


def global_counts(layout: ShardedLayout | None, nonfinite: torch.Tensor) -> torch.Tensor:
    """The NaN/Inf counts summed over ranks, when :func:`reduce_partials` left them
    local. Every rank must call it together: call it on a decision all ranks share (a
    non-finite total norm)."""
    if layout is None or not layout.counts_are_local:
        return nonfinite
    nonfinite = nonfinite.clone()
    for group, rows in layout.reductions:
        index = _row_index(rows, nonfinite)
        _put_rows(nonfinite, index, _all_reduce(_rows(nonfinite, index), "SUM", group))
    return nonfinite


def _max_over(group, power: torch.Tensor) -> torch.Tensor:
    """Maxima over ``group``; a NaN anywhere gives NaN. A MAX need not keep a NaN, so a
    NaN flag rides along in a second column (the maximum of flags: any)."""
    packed = torch.stack([power, torch.isnan(power).to(torch.float64)], dim=1)
    packed = _all_reduce(packed, "MAX", group)
    return torch.where(packed[:, 1] > 0, torch.nan, packed[:, 0])


def _all_reduce(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    import torch.distributed as dist

    tensor = tensor.contiguous()
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op), group=group)
    return tensor


def _row_index(rows: list[int], like: torch.Tensor) -> torch.Tensor | None:
    """The rows as an index on ``like``'s device; None for all rows (the common case:
    every gradient sharded the same way), which needs no index at all."""
    if len(rows) == like.shape[0]:
        return None
    return torch.tensor(rows, dtype=torch.int64).to(like.device, non_blocking=True)


def _rows(tensor: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return tensor if index is None else tensor.index_select(0, index)


def _put_rows(tensor: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> None:
    if index is None:
        tensor.copy_(values)
    else:
        tensor.index_copy_(0, index, values.to(tensor.dtype))


def _as_int64(counts: torch.Tensor) -> torch.Tensor:
    return counts.round().to(torch.int64)  # exact: float64 holds counts below 2^53


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
