"""Pointer tables and (tensor, chunk) work lists for the multi-tensor kernels, cached.

A :class:`Plan` covers one list of tensors on one device: one :class:`WorkList` per dtype
(one kernel launch each) and the positions of tensors the kernels cannot read, which take
the reference path. Building a plan costs a few host loops and one host-to-device copy;
the cache makes that a one-off as long as the gradients keep their storage, which is also
what CUDA-graph capture needs (users zero grads with ``set_to_none=False`` there).

Device metadata of one work list, a single int64 tensor (one copy to the device)::

    [ ptrs (n) | numels (n) | slots (n) | first_work (n + 1) | work_tensor (W) | work_chunk (W) ]

each part padded with zeros to an even length (``META_PART_ALIGNMENT``), so every part
starts 16 bytes into an allocation that is itself 16-byte aligned, whatever ``n`` and ``W``
are: Triton specializes pointer arguments on 16-byte divisibility, and parts whose
alignment followed the parity of ``n`` and ``W`` would compile a new kernel per parity.
``slots[j]`` is tensor ``j``'s row in the caller's outputs; work item ``w`` reads chunk
``work_chunk[w]`` of tensor ``work_tensor[w]``; tensor ``j`` owns work items
``first_work[j] .. first_work[j + 1] - 1``, so its per-chunk partials sit side by side.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import capture
from .backend import triton_can_read
from .device_cache import DeviceCache
from .launch_config import LaunchConfig, launch_config

# Plans kept at once: a training job needs one per device and parameter set, a monitor
# with clipping a few more; old entries are dropped first (except those a CUDA graph
# captured, which are kept: see device_cache).
PLAN_CACHE_SIZE = 16
# Each part of ``meta`` is padded to a multiple of this many int64s (16 bytes): the same
# divisibility Triton specializes pointer arguments on.
META_PART_ALIGNMENT = 2
# Entries a plan or work list keeps in its launch memo (_LaunchMemo).
_LAUNCH_MEMO_SIZE = 32


def _padded(length: int) -> int:
    """``length`` int64s rounded up to a whole number of aligned meta slots."""
    return -(-length // META_PART_ALIGNMENT) * META_PART_ALIGNMENT


class _LaunchMemo:
    """What launchers derive from a plan or work list and their own options (keyword
    arguments, output specs, the groups they launch), made once: the same plan serves
    every call of a training loop, and remaking them cost a few microseconds per call."""

    _launch_memo: dict

    def launch_memo(self, key: tuple, make):
        """``make()``, remembered under ``key`` (the caller's options). A few keys are in
        use at a time; the memo is emptied if callers cycle through many."""
        value = self._launch_memo.get(key)
        if value is None:
            if len(self._launch_memo) >= _LAUNCH_MEMO_SIZE:
                self._launch_memo.clear()
            value = self._launch_memo[key] = make()
        return value


@dataclass(frozen=True)
class WorkList(_LaunchMemo):
    dtype: torch.dtype
    positions: tuple[int, ...]  # the caller's indices of this group's tensors (= slots)
    config: LaunchConfig
    n_tensors: int
    n_work: int
    meta: torch.Tensor  # device int64, layout in the module docstring
    _launch_memo: dict = field(default_factory=dict, compare=False, repr=False)

    # Views of ``meta``, made on first use and kept: a view costs about a microsecond of
    # host time, and every launch passes several.
    def _part(self, start: int, length: int) -> torch.Tensor:
        return self.meta[start:start + length]

    @functools.cached_property
    def kernel_options(self) -> tuple:
        """What of this list selects the compiled kernel (for ``capture.note_launch``):
        dtype, launch config, and whether the main kernel launches at all (pointer alignment
        is decided inside the kernels, per chunk, so it selects nothing). The config's
        fields rather than the config: a dataclass hashes in Python, per launch. Kept: the
        same list serves every call of its plan."""
        config = self.config
        return (self.dtype, config.chunk, config.block, config.num_warps, self.n_work > 0)

    @functools.cached_property
    def ptrs(self) -> torch.Tensor:
        return self._part(0, self.n_tensors)

    @functools.cached_property
    def numels(self) -> torch.Tensor:
        return self._part(_padded(self.n_tensors), self.n_tensors)

    @functools.cached_property
    def slots(self) -> torch.Tensor:
        return self._part(2 * _padded(self.n_tensors), self.n_tensors)

    @functools.cached_property
    def first_work(self) -> torch.Tensor:
        return self._part(3 * _padded(self.n_tensors), self.n_tensors + 1)

    @functools.cached_property
    def work_tensor(self) -> torch.Tensor:
        return self._part(self._work_start, self.n_work)

    @functools.cached_property
    def work_chunk(self) -> torch.Tensor:
        return self._part(self._work_start + _padded(self.n_work), self.n_work)

    @property
    def _work_start(self) -> int:
        return 3 * _padded(self.n_tensors) + _padded(self.n_tensors + 1)


@dataclass(frozen=True)
class Plan(_LaunchMemo):
    device: torch.device
    groups: tuple[WorkList, ...]  # for the statistics: every position
    fallback: tuple[int, ...]  # positions the statistics read on the reference path
    # In-place updates (see ``update_targets``): the kernels update only tensors whose
    # memory overlaps no other listed tensor, in parallel; the reference path updates the
    # rest one at a time, after them, so overlapping elements see every update in turn.
    update_groups: tuple[WorkList, ...]
    update_fallback: tuple[int, ...]
    # Facts of the whole list that the key (dtypes, shapes, strides) fixes, so a call that
    # finds its plan reads them here instead of from every tensor again.
    dtypes: frozenset[torch.dtype]
    all_contiguous: bool
    numel: torch.Tensor  # device int64: every tensor's element count, in the caller's order
    _launch_memo: dict = field(default_factory=dict, compare=False, repr=False)


class PlanKey:
    """What a plan depends on (:func:`plan_key`), hashed once: the key holds five entries
    per tensor, and a cache hit would otherwise hash them on every dict operation.

    ``hash_value``: the hash when the caller has one already. The native host path
    (csrc/host_path.cpp) gives ``(device, all_contiguous, bytes)`` with a 64-bit hash of
    them: equality still compares the bytes (every tensor's metadata), so a hit is exact.
    Its keys never equal :func:`plan_key`'s (those have six parts)."""

    __slots__ = ("parts", "_hash")

    def __init__(self, parts: tuple, hash_value: int | None = None):
        self.parts = parts
        self._hash = hash(parts) if hash_value is None else hash_value

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return (isinstance(other, PlanKey) and self._hash == other._hash
                and self.parts == other.parts)

    @property
    def all_contiguous(self) -> bool:
        """Every tensor dense and contiguous (the key then holds element counts)."""
        return self.parts[1]


# Plans by key; those a CUDA graph captured are pinned rather than evicted (device_cache).
_plans = DeviceCache(PLAN_CACHE_SIZE)


def plan_for(tensors: list[torch.Tensor], device: torch.device,
             key: PlanKey | None = None) -> Plan:
    """The cached plan for ``tensors`` (all on ``device``), built on first use.

    The key (:func:`plan_key`, or ``key`` when the caller built it already) fixes every
    tensor's memory, dtype and device, so a gradient that was reallocated, resized,
    re-laid-out or moved gets a new plan rather than a stale pointer.
    """
    key = plan_key(tensors, device) if key is None else key
    plan = cached_plan(key)
    if plan is not None:
        return plan
    if capture.capturing(device):
        raise capture.capture_error("no cached work list for these gradients")
    plan = _build_plan(tensors, device)
    return _plans.add(key, plan, device, _device_tensors(plan))


def cached_plan(key: PlanKey) -> Plan | None:
    """The plan cached under ``key``, or None. A hit is a use of the plan on the current
    stream (pinned if that stream is capturing a graph) and becomes the most recent."""
    return _plans.get(key)


def _device_tensors(plan: Plan) -> list[torch.Tensor]:
    """Every device tensor a plan holds (the update groups may share the statistics' lists)."""
    metas = {id(work.meta): work.meta for work in plan.groups + plan.update_groups}
    return [*metas.values(), plan.numel]


def plan_key(tensors: list[torch.Tensor], device: torch.device) -> PlanKey:
    """What a plan depends on, read from every tensor: ``device`` (the first tensor's) and
    each tensor's address, dtype and device index, and its element count when every tensor
    is contiguous and no address is listed twice (address, count and dtype then fix its
    memory, which is all a plan reads), its shape and strides otherwise (a gapped view can
    share address and size with a dense one, and :func:`update_targets` updates tensors
    sharing an address once only when shape and strides agree too). A sparse tensor's
    entry is its layout and the position where that tensor object is first listed (an
    update touches each sparse tensor once, by identity). The device indices make a hit
    prove every tensor is still on ``device`` without a ``.device`` read per tensor (an
    address freed on one GPU can come back on another).

    Unbound C methods under ``map()``: the cheapest per-tensor reads Python offers, since
    this runs every step for every gradient; ints and dtypes also leave the garbage
    collector nothing to track, where a shape and a strides tuple per tensor did.
    """
    try:
        addresses = tuple(map(torch.Tensor.data_ptr, tensors))
        contiguous = all(map(torch.Tensor.is_contiguous, tensors))
    except RuntimeError:  # a sparse gradient has neither; it takes the reference path anyway
        first_position: dict[int, int] = {}
        addresses = tuple(t.data_ptr() if t.layout is torch.strided
                          else (t.layout, first_position.setdefault(id(t), i))
                          for i, t in enumerate(tensors))
        contiguous = False
    if contiguous and len(set(addresses)) == len(addresses):
        memory = tuple(map(torch.Tensor.numel, tensors))
    else:
        memory = (tuple(map(torch.Tensor.size, tensors)),
                  tuple(t.stride() if t.layout is torch.strided else None for t in tensors))
    dtypes = tuple(map(_DTYPE_OF, tensors))
    device_indices = tuple(map(torch.Tensor.get_device, tensors))
    return PlanKey((device, contiguous, addresses, memory, dtypes, device_indices))


_DTYPE_OF = torch.Tensor.dtype.__get__  # the attribute, read at C speed under map()


def clear_plan_cache() -> None:
    """Forget every plan, pinned ones included (for tests and benchmarks)."""
    _plans.clear()


def _build_plan(tensors: list[torch.Tensor], device: torch.device) -> Plan:
    by_dtype: dict[torch.dtype, list[int]] = {}
    fallback = []
    for position, tensor in enumerate(tensors):
        if triton_can_read(tensor):
            by_dtype.setdefault(tensor.dtype, []).append(position)
        else:
            fallback.append(position)
    groups = tuple(
        _build_work_list([tensors[i] for i in slots], slots, dtype, device)
        for dtype, slots in by_dtype.items()
    )
    facts = dict(dtypes=frozenset(t.dtype for t in tensors),
                 all_contiguous=_all_contiguous(tensors),
                 numel=int64_on([t.numel() for t in tensors], device))
    parallel, one_by_one = update_targets(tensors)
    if len(parallel) == len(tensors) and not fallback:
        return Plan(device=device, groups=groups, fallback=(), update_groups=groups,
                    update_fallback=(), **facts)
    in_parallel = set(parallel)
    update_groups = tuple(
        _build_work_list([tensors[i] for i in kept], kept, dtype, device)
        for dtype, slots in by_dtype.items()
        if (kept := [i for i in slots if i in in_parallel])
    )
    update_fallback = sorted(set(one_by_one) | (set(fallback) & in_parallel))
    return Plan(device=device, groups=groups, fallback=tuple(fallback),
                update_groups=update_groups, update_fallback=tuple(update_fallback), **facts)


def _all_contiguous(tensors: list[torch.Tensor]) -> bool:
    try:
        return all(map(torch.Tensor.is_contiguous, tensors))
    except RuntimeError:  # sparse tensors have no is_contiguous
        return False


def int64_on(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, copied without a host-device sync."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()  # pinned: the copy does not wait for the GPU
    return host.to(device, non_blocking=True)


def update_targets(tensors: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Which positions an in-place update must touch, split into those it may update in
    parallel and those it must update one at a time, in order.

    A view listed again with the same address, shape, strides and dtype is updated once,
    at its first position (two programs updating one element at once would race on a
    GPU). Tensors whose memory overlaps without being identical views (a prefix of a
    buffer and the buffer, shifted slices) are all updated one at a time, as torch does,
    so an element they share is scaled once per tensor, exactly as in torch. Everything
    else overlaps nothing and may be updated in parallel. Sparse tensors own their values:
    each is updated one at a time, once.
    """
    if _dense_and_disjoint(tensors):
        return list(range(len(tensors))), []
    spans = []  # (first byte, end byte, position)
    parallel, one_by_one, seen_sparse = [], [], set()
    for position, tensor in enumerate(tensors):
        if tensor.layout is not torch.strided:
            if id(tensor) not in seen_sparse:
                seen_sparse.add(id(tensor))
                one_by_one.append(position)
            continue
        if tensor.numel() == 0:
            parallel.append(position)  # no memory: overlaps nothing
            continue
        start = tensor.data_ptr()
        end = start + (_last_offset(tensor) + 1) * tensor.element_size()
        spans.append((start, end, position))
    spans.sort()
    cluster, cluster_end = [], -1
    for start, end, position in spans + [(None, None, None)]:
        if position is not None and start < cluster_end:
            cluster.append(position)
            cluster_end = max(cluster_end, end)
            continue
        if cluster:
            distinct = _first_of_each_view(tensors, sorted(cluster))
            (parallel if len(distinct) == 1 else one_by_one).extend(distinct)
        cluster, cluster_end = [position], end
    return sorted(parallel), sorted(one_by_one)


def _dense_and_disjoint(tensors: list[torch.Tensor]) -> bool:
    """The common case, decided with C-level per-tensor reads only: contiguous tensors
    whose byte ranges do not meet. False means "look closer", not "overlapping"."""
    try:
        if not all(map(torch.Tensor.is_contiguous, tensors)):
            return False
        starts = list(map(torch.Tensor.data_ptr, tensors))
    except RuntimeError:  # sparse tensors
        return False
    sizes = map(torch.Tensor.nbytes.__get__, tensors)  # the property, read without a lambda
    spans = sorted(zip(starts, map(int.__add__, starts, sizes)))
    return all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def overlaps_itself(tensor: torch.Tensor) -> bool:
    """A strided tensor some of whose elements share memory (an expanded tensor): its
    elements span fewer slots than it has, or a dimension of size > 1 has stride 0."""
    if tensor.layout is not torch.strided or tensor.numel() <= 1:
        return False
    if any(size > 1 and stride == 0 for size, stride in zip(tensor.shape, tensor.stride())):
        return True
    return _last_offset(tensor) + 1 < tensor.numel()


def _last_offset(tensor: torch.Tensor) -> int:
    """The offset, in elements, of ``tensor``'s last element from its first."""
    return sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def _first_of_each_view(tensors: list[torch.Tensor], positions: list[int]) -> list[int]:
    first: dict[tuple, int] = {}
    for position in positions:
        tensor = tensors[position]
        key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
        first.setdefault(key, position)
    return list(first.values())


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
    parts = [
        torch.tensor(ptrs, dtype=torch.int64),
        numels,
        torch.tensor(slots, dtype=torch.int64),
        first_work,
        work_tensor,
        work_chunk,
    ]
    host_meta = torch.zeros(sum(_padded(len(part)) for part in parts), dtype=torch.int64)
    start = 0
    for part in parts:
        host_meta[start:start + len(part)] = part
        start += _padded(len(part))
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
        meta=meta,
    )
