"""Pointer tables and (tensor, chunk) work lists for the multi-tensor kernels, cached.

A :class:`Plan` covers one list of tensors on one device: one :class:`WorkList` per dtype
(one kernel launch each) and the positions of tensors the kernels cannot read, which take
the reference path. Building a plan costs a few host loops and one host-to-device copy;
the cache makes that a one-off as long as the gradients keep their storage, which is also
what CUDA-graph capture needs (users zero grads with ``set_to_none=False`` there).

Device metadata of one work list, a single int64 tensor (one copy to the device)::

    [ ptrs (n) | numels (n) | slots (n) | first_work (n + 1) | work_tensor (W) | work_chunk (W) ]

``slots[j]`` is tensor ``j``'s row in the caller's outputs; work item ``w`` reads chunk
``work_chunk[w]`` of tensor ``work_tensor[w]``; tensor ``j`` owns work items
``first_work[j] .. first_work[j + 1] - 1``, so its per-chunk partials sit side by side.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from .backend import triton_can_read
from .kernels.config import LaunchConfig, launch_config

# Plans kept at once: a training job needs one per device and parameter set, a monitor
# with clipping a few more; old entries are dropped first.
PLAN_CACHE_SIZE = 16
# 16-byte aligned base pointers let the kernels use 128-bit loads.
LOAD_ALIGNMENT_BYTES = 16


@dataclass(frozen=True)
class WorkList:
    dtype: torch.dtype
    positions: tuple[int, ...]  # the caller's indices of this group's tensors (= slots)
    config: LaunchConfig
    n_tensors: int
    n_work: int
    aligned: bool
    meta: torch.Tensor  # device int64, layout in the module docstring

    def _part(self, start: int, length: int) -> torch.Tensor:
        return self.meta[start:start + length]

    @property
    def ptrs(self) -> torch.Tensor:
        return self._part(0, self.n_tensors)

    @property
    def numels(self) -> torch.Tensor:
        return self._part(self.n_tensors, self.n_tensors)

    @property
    def slots(self) -> torch.Tensor:
        return self._part(2 * self.n_tensors, self.n_tensors)

    @property
    def first_work(self) -> torch.Tensor:
        return self._part(3 * self.n_tensors, self.n_tensors + 1)

    @property
    def work_tensor(self) -> torch.Tensor:
        return self._part(4 * self.n_tensors + 1, self.n_work)

    @property
    def work_chunk(self) -> torch.Tensor:
        return self._part(4 * self.n_tensors + 1 + self.n_work, self.n_work)


@dataclass(frozen=True)
class Plan:
    device: torch.device
    groups: tuple[WorkList, ...]  # for the statistics: every position
    # For in-place updates: a tensor listed twice would be updated by two programs at once
    # (a race on GPUs), so each address is updated once, at its first position.
    update_groups: tuple[WorkList, ...]
    fallback: tuple[int, ...]  # positions served by the reference path


_plans: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()


def plan_for(tensors: list[torch.Tensor], device: torch.device) -> Plan:
    """The cached plan for ``tensors`` (all on ``device``), built on first use.

    The key is every tensor's address, shape, strides and dtype, so a gradient that was
    reallocated, resized or re-laid-out gets a new plan rather than a stale pointer.
    """
    key = _plan_key(tensors, device)
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "gradstats: no cached work list for these gradients during CUDA-graph capture. "
            "Run the same call once before capturing, and keep the gradients' storage "
            "between steps (optimizer.zero_grad(set_to_none=False))."
        )
    plan = _build_plan(tensors, device)
    _plans[key] = plan
    if len(_plans) > PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


def _plan_key(tensors: list[torch.Tensor], device: torch.device) -> tuple:
    try:
        # Unbound C methods under map(): the cheapest per-tensor reads Python offers, since
        # this runs every step for every gradient. Shape and strides, not just size and
        # contiguity: a gapped view can share address and size with a dense one.
        addresses = tuple(map(torch.Tensor.data_ptr, tensors))
        strides = tuple(map(torch.Tensor.stride, tensors))
    except RuntimeError:  # a sparse gradient has neither; it takes the reference path anyway
        addresses = tuple(t.data_ptr() if t.layout is torch.strided else -1 for t in tensors)
        strides = tuple(t.stride() if t.layout is torch.strided else None for t in tensors)
    shapes = tuple(t.shape for t in tensors)
    return device, addresses, shapes, strides, tuple(t.dtype for t in tensors)


def clear_plan_cache() -> None:
    _plans.clear()


def _build_plan(tensors: list[torch.Tensor], device: torch.device) -> Plan:
    by_dtype: dict[torch.dtype, list[int]] = {}
    fallback = []
    first_position_of: dict[int, int] = {}  # address -> first position holding it
    for position, tensor in enumerate(tensors):
        if triton_can_read(tensor):
            by_dtype.setdefault(tensor.dtype, []).append(position)
            first_position_of.setdefault(tensor.data_ptr(), position)
        else:
            fallback.append(position)
    groups = tuple(
        _build_work_list([tensors[i] for i in slots], slots, dtype, device)
        for dtype, slots in by_dtype.items()
    )
    if len(first_position_of) == len(tensors) - len(fallback):
        return Plan(device=device, groups=groups, update_groups=groups, fallback=tuple(fallback))
    first_positions = set(first_position_of.values())
    update_groups = tuple(
        _build_work_list([tensors[i] for i in kept], kept, dtype, device)
        for dtype, slots in by_dtype.items()
        if (kept := [i for i in slots if i in first_positions])
    )
    return Plan(device=device, groups=groups, update_groups=update_groups,
                fallback=tuple(fallback))


def _build_work_list(
    tensors: list[torch.Tensor], slots: list[int], dtype: torch.dtype, device: torch.device
) -> WorkList:
    config = launch_config(dtype, device)
    ptrs = [t.data_ptr() for t in tensors]
    numels = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    chunks_per_tensor = (numels + config.chunk - 1) // config.chunk
    first_work = torch.zeros(len(tensors) + 1, dtype=torch.int64)
    torch.cumsum(chunks_per_tensor, 0, out=first_work[1:])
    n_work = int(first_work[-1])
    work_tensor = torch.repeat_interleave(torch.arange(len(tensors)), chunks_per_tensor)
    work_chunk = torch.arange(n_work) - first_work[work_tensor]
    host_meta = torch.cat([
        torch.tensor(ptrs, dtype=torch.int64),
        numels,
        torch.tensor(slots, dtype=torch.int64),
        first_work,
        work_tensor,
        work_chunk,
    ])
    if device.type == "cuda":
        # Pinned memory makes the copy asynchronous: no host-device sync, even on a miss.
        # (The caching host allocator keeps the buffer until the copy is done.)
        host_meta = host_meta.pin_memory()
    meta = host_meta.to(device, non_blocking=True)
    return WorkList(
        dtype=dtype,
        positions=tuple(slots),
        config=config,
        n_tensors=len(tensors),
        n_work=n_work,
        aligned=all(p % LOAD_ALIGNMENT_BYTES == 0 for p in ptrs),
        meta=meta,
    )
