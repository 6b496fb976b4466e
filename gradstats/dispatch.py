"""Which code runs for which tensors: the one place that routes work to a backend.

Each function takes tensors of one device (``scale_`` and ``clamp_`` take any mix) and
sends every dtype group the kernels can read to its Triton launch (on the native backend:
the C++ ops of ``gradstats._C``), everything else to the reference twin, writing both into
the same outputs.

A call resolves its :class:`Route` once (:func:`route`: device, backend, cached plan, dtype
set) and hands it to every step, so the plan key is built once per call and no step reads
device or dtype from every tensor again.

Every Triton launch for CUDA tensors runs under ``torch.cuda.device(<their device>)``
(:func:`on_device`): Triton launches on the current device's current stream, so without the
guard gradients on ``cuda:1`` while ``cuda:0`` is current would be read by a kernel on the
wrong GPU (or fail without peer access), unordered with the backward that wrote them.

Every Triton launch is announced first to :func:`capture.note_launch` with the signature of
the compiled kernel it needs, so a kernel never compiles inside CUDA-graph capture.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import types
from typing import NamedTuple

import torch

from . import capture, known_tensors, native, reference
from .backend import TRITON_DTYPES, Backend, choose_backend, device_type, triton_can_read
from .norms import NormKind, norm_kind
from .worklist import Plan, PlanKey, cached_plan, plan_for, plan_key, update_targets

FP32_MAX = torch.finfo(torch.float32).max
_DEVICE_OF = torch.Tensor.device.__get__  # the attributes, read at C speed under map()
_DTYPE_OF = torch.Tensor.dtype.__get__


class Route(NamedTuple):
    """Which code runs for one list of tensors, resolved once per call.

    ``backend`` is None when the tensors span several devices (each device then resolves
    its own); ``plan`` is the cached Triton plan when the backend is Triton. (A named
    tuple: a frozen dataclass took 0.8 us to make, a named tuple 0.3.)
    """

    device: torch.device  # the first tensor's
    backend: Backend | None
    plan: Plan | None
    dtypes: frozenset[torch.dtype]
    # Every tensor dense and contiguous: known from the plan or the native host pass;
    # None when neither was at hand (not known without a pass over the tensors).
    all_contiguous: bool | None = None
    # The native host pass's listing of the tensors for the CPU statistics pass
    # (native.HostFacts.cpu_listing), when it made one.
    cpu_listing: object = None


# The flags of native.host_pass (csrc/host_path.cpp).
_SINGLE_DEVICE, _ALL_CONTIGUOUS = 1, 4


def route(tensors: list[torch.Tensor], facts: native.HostFacts | None = None) -> Route:
    """The route for non-empty ``tensors``.

    With the native host path (``facts``: this call's ``native.host_pass`` of the tensors,
    else made here), one C++ walk gives devices, dtypes and the exact plan key, and a
    plan-cache hit answers the rest. Without it, on the Triton backend a list of tensors
    seen before (:mod:`known_tensors`) finds its plan key from three reads per tensor, any
    other list from one key pass; a plan-cache hit then answers everything. Otherwise one
    pass reads devices and dtypes."""
    if facts is None:
        facts = native.host_pass(tensors, False)
    if facts is not None:
        return _route_from_facts(tensors, facts)
    device = tensors[0].device
    backend = choose_backend(device)
    key = None
    if backend is Backend.TRITON:
        key = known_tensors.remembered_key(tensors, device)
        recognised = key is not None
        if not recognised:
            key = plan_key(tensors, device)
        plan = cached_plan(key)
        if plan is not None:
            if not recognised:
                known_tensors.remember(tensors, device, key)
            return Route(device, backend, plan, plan.dtypes, plan.all_contiguous)
    dtypes = frozenset(map(_DTYPE_OF, tensors))
    if any(d != device for d in set(map(_DEVICE_OF, tensors))):
        return Route(device, None, None, dtypes)
    if backend is Backend.TRITON:
        plan = plan_for(tensors, device, key)
        known_tensors.remember(tensors, device, key)
        return Route(device, backend, plan, dtypes, plan.all_contiguous)
    return Route(device, backend, None, dtypes)


def _route_from_facts(tensors: list[torch.Tensor], facts: native.HostFacts) -> Route:
    """:func:`route` from the native host pass: no per-tensor Python work. Its key fixes
    what :func:`plan_key` fixes: every tensor's address, element count, dtype, layout and
    device, shape and strides where not contiguous or sharing an address, and which
    positions hold the same sparse tensor."""
    device, dtypes, flags = facts.device, facts.dtypes, facts.flags
    backend = choose_backend(device)
    if not flags & _SINGLE_DEVICE:
        return Route(device, None, None, dtypes)
    all_contiguous = bool(flags & _ALL_CONTIGUOUS)
    if backend is Backend.TRITON:
        plan = plan_for(tensors, device, native_plan_key(facts))
        return Route(device, backend, plan, dtypes, all_contiguous)
    return Route(device, backend, None, dtypes, all_contiguous, facts.cpu_listing)


# The last native key's bytes object and the plan key made from it (see native_plan_key).
_last_native_key: tuple[bytes | None, PlanKey | None] = (None, None)


def native_plan_key(facts: native.HostFacts) -> PlanKey:
    """The plan key in ``native.host_pass``'s facts: its bytes, hashed in C++. The walk
    returns the same bytes object as last time for the same bytes, so the same gradients
    as last call get the same key object, which the plan cache finds by identity: no key
    comparison (100 KB of bytes at 4,500 gradients) on the usual hit."""
    global _last_native_key
    last_bytes, last_key = _last_native_key
    if facts.key_bytes is last_bytes:
        return last_key
    key = PlanKey((facts.device, bool(facts.flags & _ALL_CONTIGUOUS), facts.key_bytes),
                  facts.key_hash)
    _last_native_key = (facts.key_bytes, key)
    return key


@functools.cache
def _triton_launchers() -> types.SimpleNamespace:
    """The Triton launchers, imported on first use (importing gradstats never imports
    triton) and kept: an import statement in the call costs ~1.4 us even when the module is
    loaded, several times per call on a path whose host time is counted in tens of us."""
    from .kernels import apply, finalize, stats

    return types.SimpleNamespace(accumulate_stats_=stats.accumulate_stats_,
                                 partial_specs=stats.partial_specs,
                                 finalize_=finalize.finalize_, scale_=apply.scale_,
                                 clamp_=apply.clamp_)


_NO_GUARD = contextlib.nullcontext()  # reusable: it keeps no state between uses


def on_device(device: torch.device):
    """The guard every Triton launch runs under: the tensors' CUDA device is current, so
    Triton launches on it, on its current stream. Nothing for other devices."""
    if device_type(device) == "cuda":
        return torch.cuda.device(device)
    return _NO_GUARD


def accumulate_stats(
    tensors: list[torch.Tensor], p: float, num_bins: int, min_exp: int,
    tensors_route: Route | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor power (float64), non-finite count (int64), histogram (int64, [n, num_bins]).
    ``tensors_route``: this call's :func:`route` of ``tensors``, when the caller has it."""
    kind = norm_kind(p)
    if kind == NormKind.COMPOSED:
        kind, p = NormKind.L2, 2.0  # the caller composes torch's norm; counts still fused
    if tensors_route is None:
        tensors_route = route(tensors)
    device = tensors_route.device
    if tensors_route.backend is Backend.TORCH:
        return reference.accumulate_stats(tensors, p, kind, num_bins, min_exp)
    if tensors_route.backend is Backend.NATIVE:
        return _accumulate_on_native(tensors, p, kind, num_bins, min_exp, tensors_route)
    with on_device(device):
        return _accumulate_on_triton(tensors, p, kind, num_bins, min_exp, tensors_route.plan)


def _accumulate_on_triton(tensors, p, kind, num_bins, min_exp, plan: Plan):
    launchers = _triton_launchers()
    device = plan.device
    launched, fallback, specs, signatures = plan.launch_memo(
        ("stats", kind, num_bins, min_exp),
        lambda: _stats_launches(plan, kind, num_bins, min_exp))
    power, nonfinite, hist, *partials = native.new_tensors(device, specs)
    for index, group in enumerate(launched):
        capture.note_launch(signatures[index], device)
        launchers.accumulate_stats_(group, p, kind, num_bins, min_exp, power, nonfinite, hist,
                                    partials[2 * index:2 * index + 2])
    _fill_from_reference(tensors, fallback, p, kind, num_bins, min_exp, power, nonfinite, hist)
    return power, nonfinite, hist


def _stats_launches(plan: Plan, kind: NormKind, num_bins: int, min_exp: int):
    """What a statistics call on ``plan`` launches: the groups the kernels read, the
    positions left to the reference, the ``native.new_tensors`` specs of the outputs and
    of each launched group's scratch, and each launch's signature (``capture.note_launch``)."""
    fallback = list(plan.fallback)
    launched = []
    for group in plan.groups:
        if kind == NormKind.LP and group.dtype == torch.float64:
            # |x|^p for general p needs log2/exp2; in float64 those are libdevice calls we
            # do not rely on, and float32 ones would lose float64's precision.
            fallback.extend(group.positions)
        else:
            launched.append(group)
    n = len(plan.numel)
    # An empty histogram (none asked for) needs no zeroing.
    specs = [((n,), torch.float64, False), ((n,), torch.int64, False),
             ((n, num_bins), torch.int64, num_bins > 0)]
    partial_specs = _triton_launchers().partial_specs
    for group in launched:
        specs.extend(partial_specs(group))
    # The histogram options select constexprs only when the histogram is on.
    signatures = tuple(("stats", plan.device, *group.kernel_options, kind, num_bins,
                        num_bins and min_exp) for group in launched)
    return tuple(launched), tuple(fallback), tuple(specs), signatures


def _fill_from_reference(tensors, positions, p, kind, num_bins, min_exp, power, nonfinite,
                         hist) -> None:
    """Rows ``positions`` of the outputs from the PyTorch reference, one tensor at a time
    (the tensors no kernel reads: a few, if any)."""
    for position in positions:
        one_power, one_nonfinite, one_hist = reference.accumulate_stats(
            [tensors[position]], p, kind, num_bins, min_exp)
        power[position] = one_power[0]
        nonfinite[position] = one_nonfinite[0]
        hist[position] = one_hist[0]


def _accumulate_on_native(tensors, p, kind, num_bins, min_exp, tensors_route: Route):
    """The C++ pass over every tensor of a dtype it reads that is contiguous or
    permuted-dense (transposed, channels-last: read as the flat block it fills, as the
    Triton kernels read it, and chunked as the reference chunks it); the reference over the
    rest (sparse, complex, other dtypes, strided with gaps or overlaps)."""
    if tensors_route.cpu_listing is not None:  # the host walk listed them for this pass
        outputs = native.cpu_stats_listed(tensors_route.cpu_listing, tensors, p, kind,
                                          num_bins, min_exp)
        if outputs is not None:
            return outputs
    readable_dtypes = tensors_route.dtypes.issubset(TRITON_DTYPES)
    if tensors_route.all_contiguous and readable_dtypes:  # known from the host walk
        return _native_stats(tensors, p, kind, num_bins, min_exp)
    try:  # the common case, decided with C-level per-tensor reads only
        everything = readable_dtypes and all(map(torch.Tensor.is_contiguous, tensors))
    except RuntimeError:  # sparse CSR tensors have no is_contiguous
        everything = False
    if everything:  # (a sparse COO tensor is never contiguous)
        return _native_stats(tensors, p, kind, num_bins, min_exp)
    readable = [i for i, t in enumerate(tensors)
                if t.dtype in TRITON_DTYPES and t.layout is torch.strided
                and (t.is_contiguous() or triton_can_read(t))]
    if len(readable) == len(tensors):
        return _native_stats(tensors, p, kind, num_bins, min_exp)
    n = len(tensors)
    power = torch.empty(n, dtype=torch.float64)
    nonfinite = torch.empty(n, dtype=torch.int64)
    hist = torch.empty(n, num_bins, dtype=torch.int64)
    if readable:  # an empty list would give the dispatcher no tensor to pick a kernel by
        parts = _native_stats([tensors[i] for i in readable], p, kind, num_bins, min_exp)
        index = torch.tensor(readable, dtype=torch.int64)
        for output, part in zip((power, nonfinite, hist), parts):
            output.index_copy_(0, index, part)
    _fill_from_reference(tensors, sorted(set(range(n)).difference(readable)), p, kind,
                         num_bins, min_exp, power, nonfinite, hist)
    return power, nonfinite, hist


def _native_stats(tensors, p, kind, num_bins, min_exp):
    """``native.cpu_stats`` on readable tensors: called directly, beside the dispatcher,
    where :func:`native.cpu_stats_direct` serves the list; otherwise the op, its inputs
    detached only where it could record autograd history: every public entry point runs
    under ``torch.no_grad``, and a detach (a new tensor object per gradient) cost more host
    time than the whole pass at 4,500 gradients."""
    outputs = native.cpu_stats_direct(tensors, p, kind, num_bins, min_exp)
    if outputs is not None:
        return outputs
    if torch.is_grad_enabled():
        tensors = list(map(torch.Tensor.detach, tensors))
    return native.cpu_stats(tensors, p, kind, num_bins, min_exp)


def finalize(
    power: torch.Tensor, p: float, max_norm: float, norms_dtype: torch.dtype,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor norms, total norm and clip coefficient (all ``norms_dtype``) from powers.
    ``backend``: the one serving ``power``'s device, when the caller has resolved it (its
    call's route): deciding it again reads the environment (~2 us)."""
    kind = norm_kind(p)
    device = power.device
    if backend is None:
        backend = choose_backend(device)
    # General p needs a float64 power root, and a finite max_norm beyond fp32's range does
    # not survive the trip into the kernel: torch does those (a few tiny launches).
    if (backend is not Backend.TRITON or kind == NormKind.LP
            or FP32_MAX < abs(max_norm) < math.inf):
        return reference.finalize(power, p, kind, max_norm, norms_dtype)

    finalize_ = _triton_launchers().finalize_
    norms, total, clip_coef = native.new_tensors(
        device, ((power.shape, norms_dtype, False), ((), norms_dtype, False),
                 ((), norms_dtype, False)))
    capture.note_launch(("finalize", device, kind, norms_dtype), device)
    with on_device(device):
        finalize_(power, kind, max_norm, norms, total, clip_coef)
    return norms, total, clip_coef


def _by_device(
    tensors: list[torch.Tensor], tensors_route: Route | None = None,
) -> list[tuple[torch.device, Backend, list, Plan | None]]:
    """Tensors grouped by device, each with its backend (and plan, when the route has it),
    all resolved before any tensor is modified, so a device no backend can serve fails with
    nothing half-updated."""
    if tensors_route is not None and tensors_route.backend is not None:  # one device
        return [(tensors_route.device, tensors_route.backend, tensors, tensors_route.plan)]
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.device, []).append(tensor)
    # One device's stream captures, the others' kernels would run at once, out of order.
    if len(groups) > 1 and any(map(capture.capturing, groups)):
        raise capture.capture_error("tensors on several devices",
                                    "Capture one call per device, each on that device's tensors.")
    return [(device, choose_backend(device), group, None) for device, group in groups.items()]


def _each_view_once(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reference path's twin of ``Plan.update_groups``: a view listed twice (same
    address, shape, strides, dtype) is updated once. Overlapping views that differ are all
    updated, one after the other, as torch does; so is everything on this path."""
    try:
        addresses = list(map(torch.Tensor.data_ptr, tensors))
    except RuntimeError:  # a sparse tensor has no data_ptr
        addresses = [t.data_ptr() if t.layout is torch.strided else id(t) for t in tensors]
    if len(set(addresses)) == len(addresses):
        return tensors  # the common case: no address listed twice
    positions = update_targets(tensors)
    return [tensors[i] for i in sorted(positions[0] + positions[1])]


def scale_(tensors: list[torch.Tensor], clip_coef: torch.Tensor,
           tensors_route: Route | None = None) -> None:
    """``t *= clip_coef`` for every tensor; no memory traffic on Triton when it is >= 1."""
    for device, backend, group, plan in _by_device(tensors, tensors_route):
        # A copy to the CPU must block: the CPU reads the coefficient right away. (No call
        # of .to when it is there already: ~0.8 us.)
        coef = (clip_coef if clip_coef.device == device
                else clip_coef.to(device, non_blocking=device_type(device) != "cpu"))
        if backend is Backend.NATIVE:
            _scale_on_native(group, coef)
            continue
        if backend is not Backend.TRITON:
            reference.scale_(_each_view_once(group), coef)
            continue
        triton_scale_ = _triton_launchers().scale_
        plan = plan or plan_for(group, device)
        # Every launch is announced before the first one: a refusal in capture must come
        # before any gradient is scaled, never between two dtype groups.
        for work in plan.update_groups:
            capture.note_launch(("scale", device, *work.kernel_options, coef.dtype), device)
        with on_device(device):
            for work in plan.update_groups:
                triton_scale_(work, coef)
        _mark_written(group)
        if plan.update_fallback:
            reference.scale_([group[i] for i in plan.update_fallback], coef)


def _mark_written(tensors: list[torch.Tensor]) -> None:
    # What torch's in-place ops (and the native pass) do: a Triton kernel writes through
    # raw pointers, so without this the tensors' version counters would not show the
    # change (autograd's saved-tensor checks and DDPStatsHook.ready rely on them). torch's
    # increment_version costs ~90 ns a tensor; the native layer's ~9.
    if not native.bump_versions(tensors):
        torch.autograd.graph.increment_version(tensors)


def clamp_(tensors: list[torch.Tensor], lo: float, hi: float,
           tensors_route: Route | None = None) -> None:
    """``t.clamp_(lo, hi)`` for every tensor, one read and one write each on Triton and
    native."""
    for device, backend, group, _ in _by_device(tensors, tensors_route):
        if backend is Backend.NATIVE:
            _clamp_on_native(group, lo, hi)
            continue
        if backend is not Backend.TRITON:
            reference.clamp_(_each_view_once(group), lo, hi)
            continue
        triton_clamp_ = _triton_launchers().clamp_
        plan = plan_for(group, device)
        left_over = [group[i] for i in plan.update_fallback]
        # Kernel scalars are fp32; clamping fp64 to a rounded bound would differ from
        # torch, so fp64 gradients take the reference path.
        launched = [work for work in plan.update_groups if work.dtype != torch.float64]
        for work in plan.update_groups:
            if work.dtype == torch.float64:
                left_over.extend(group[i] for i in work.positions)
        for work in launched:  # all announced before the first launch, as in scale_
            capture.note_launch(("clamp", device, *work.kernel_options), device)
        with on_device(device):
            for work in launched:
                triton_clamp_(work, lo, hi)
        _mark_written(group)
        if left_over:
            reference.clamp_(left_over, lo, hi)


def _native_took_all(update, tensors: list[torch.Tensor], *args) -> bool:
    """Try the C++ update on the whole list: True when it did it. The ops refuse only
    before they write anything (csrc/cpu_apply.cpp ``check_tensors``), so False (a tensor
    they cannot read) means nothing was changed. The common case, every gradient readable,
    so costs no per-tensor Python: a split costs as much host time as the update of
    thousands of small tensors."""
    try:
        update(tensors, *args)
    except RuntimeError:  # also NotImplementedError: no kernel for sparse tensors
        return False
    return True


def _update_in_runs(native_update, reference_update, tensors: list[torch.Tensor],
                    *args) -> None:
    """A list the C++ ops cannot read whole: each view once, then runs of consecutive
    tensors, the readable ones (:func:`triton_can_read`: a dtype the ops know, one dense
    block) by the C++ op and the others by the reference, in list order, so overlapping
    views end as torch's loop leaves them. An inference tensor is refused first: the C++
    op would refuse it only after earlier runs were updated."""
    if not torch.is_inference_mode_enabled() and any(map(torch.Tensor.is_inference, tensors)):
        raise RuntimeError("gradstats: an inference tensor cannot be updated in place outside "
                           "torch.inference_mode(); clone it into a normal tensor first")
    for readable, run in itertools.groupby(_each_view_once(tensors), key=triton_can_read):
        (native_update if readable else reference_update)(list(run), *args)


def _scale_on_native(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    """The C++ update over the tensors it reads, the reference over the rest. The C++ op
    updates a view listed twice once and overlapping views one at a time, as the
    reference path does after :func:`_each_view_once`."""
    if coef.dtype not in TRITON_DTYPES or coef.numel() != 1:
        reference.scale_(_each_view_once(tensors), coef)
        return
    value = coef.item()  # a CPU tensor: no device sync
    if not (value < 1 or value != value):
        return  # no clipping needed: nothing to read or write (a NaN does scale)
    if not _native_took_all(native.cpu_scale_, tensors, coef):
        _update_in_runs(native.cpu_scale_, reference.scale_, tensors, coef)


def _clamp_on_native(tensors: list[torch.Tensor], lo: float, hi: float) -> None:
    """As :func:`_scale_on_native`, for ``clamp_``."""
    if not _native_took_all(native.cpu_clamp_, tensors, lo, hi):
        _update_in_runs(native.cpu_clamp_, reference.clamp_, tensors, lo, hi)
