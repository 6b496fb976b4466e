"""``grad_stats``: every gradient's norm, non-finite count and log2 histogram in one pass.

Data flow: gradients -> per-device ``accumulate_stats`` (one read of every gradient) ->
per-tensor powers -> ``finalize`` (norms, total norm, clip coefficient) -> optional
``scale_``. Every result stays on the gradients' device; nothing waits for the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import capture, dispatch, distributed, native, ops, reference
from .backend import Backend
from .checks import check_histogram_range, check_norm_inputs, check_updatable, non_negative_float
from .device_cache import DeviceCache
from .grad_mode import no_grad
from .host_path import local_gradients_and_route
from .norms import NormKind, norm_kind, parse_norm_type
from .params import ParametersLike, named_items
from .worklist import int64_on


@dataclass
class GradStats:
    """Statistics of one set of gradients, one row per gradient tensor.

    Attributes:
        norms (Tensor): per-tensor ``norm_type`` norms; float32, or float64 when any
            gradient is float64.
        total_norm (Tensor): the norm of all gradients together (0-d, dtype of ``norms``).
        nonfinite (Tensor): per-tensor count of NaN and +-Inf elements (int64).
        hist (Tensor or None): ``[n, num_bins]`` int64 counts. Column 0 counts exact zeros;
            column ``k >= 1`` counts finite non-zero ``x`` with
            ``floor(log2|x|) == min_exp + k - 1``, smaller values in column 1 and larger
            ones in the last column. Non-finite values are not counted here.
        numel (Tensor): per-tensor element counts (int64).
        names (list of str or None): parameter names, when they were given.
        clip_coef (Tensor or None): the coefficient the gradients were scaled by, when
            ``max_norm`` was given (1 when no clipping was needed).
    """

    norms: torch.Tensor
    total_norm: torch.Tensor
    nonfinite: torch.Tensor
    hist: torch.Tensor | None
    numel: torch.Tensor
    names: list[str] | None
    clip_coef: torch.Tensor | None
    norm_type: float
    num_bins: int
    min_exp: int

    def __len__(self) -> int:
        return self.norms.numel()

    def bin_edges(self) -> torch.Tensor:
        """The ``num_bins + 1`` histogram edges (float64, CPU) for plotting or logging:
        ``[0, 2^min_exp, 2^(min_exp+1), ..., 2^(min_exp+num_bins-1)]``. Column 0 (exact
        zeros) is drawn as ``[0, 2^min_exp)``; column ``k`` as
        ``[2^(min_exp+k-1), 2^(min_exp+k))``."""
        exponents = torch.arange(self.min_exp, self.min_exp + self.num_bins, dtype=torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.exp2(exponents)])


@dataclass
class FusedResult:
    """What one fused pass produced, before any scaling."""

    nonfinite: torch.Tensor
    hist: torch.Tensor
    norms: torch.Tensor
    total_norm: torch.Tensor
    clip_coef: torch.Tensor
    numel: torch.Tensor | None = None  # global counts, when the pass was given local ones


def fused_pass(
    grads: list[torch.Tensor], p: float, *, num_bins: int, min_exp: int, max_norm: float,
    route: dispatch.Route | None = None,
    sharding: distributed.ShardedLayout | None = None, numel: torch.Tensor | None = None,
) -> FusedResult:
    """Statistics of non-empty ``grads``; results on the first gradient's device.
    ``route``: this call's ``ops.route(grads)``, when the caller has it. ``sharding``:
    ``grads`` are local shards (``sharding.tensors``), whose partials (and ``numel``) are
    combined across ranks before the norms are taken."""
    first_device = grads[0].device
    composed = norm_kind(p) == NormKind.COMPOSED
    if route is not None and route.backend is not None:  # one device, resolved already
        power, nonfinite, hist = ops.accumulate_stats(grads, p, num_bins, min_exp, route)
    else:
        power, nonfinite, hist = _accumulate_on_each_device(grads, p, num_bins, min_exp)
    if sharding is not None and composed:
        # The fused pass gave the 2-norm's power (only its counts serve here): each shard's
        # own partial of torch's norm takes its place, to be combined across ranks.
        power = reference.composed_partials(grads, p, first_device)
    if sharding is not None:
        power, nonfinite, hist, numel = distributed.reduce_partials(
            sharding, p, power, nonfinite, hist, numel)
    dtypes = route.dtypes if route is not None else {g.dtype for g in grads}
    norms_dtype = (torch.float64 if torch.float64 in dtypes or torch.complex128 in dtypes
                   else torch.float32)
    if not composed:
        backend = route.backend if route is not None else None
        return finalize_partials(power, nonfinite, hist, p, max_norm, norms_dtype, numel,
                                 backend)
    per_tensor = ([reference.composed_norm(g, p) for g in grads] if sharding is None
                  else reference.composed_norms_from_partials(power, p, grads))
    norms = torch.stack([n.to(first_device, norms_dtype) for n in per_tensor])
    total = reference.composed_total(per_tensor, p, first_device).to(norms_dtype)
    clip_coef = torch.clamp(max_norm / (total + reference.EPS), max=1.0)
    return FusedResult(nonfinite=nonfinite, hist=hist, norms=norms, total_norm=total,
                       clip_coef=clip_coef, numel=numel)


def finalize_partials(
    power: torch.Tensor, nonfinite: torch.Tensor, hist: torch.Tensor, p: float,
    max_norm: float, norms_dtype: torch.dtype, numel: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> FusedResult:
    """The end of a fused pass whose per-tensor partials are at hand (``p`` a fused norm
    type, not 0, < 0 or -inf): norms, total norm and clip coefficient from the powers.
    Shared with :mod:`gradstats.ddp_hook`, which accumulates the partials during backward.
    ``backend``: the one serving ``power``'s device, when the caller knows it."""
    norms, total, clip_coef = ops.finalize(power, p, max_norm, norms_dtype, backend)
    return FusedResult(nonfinite=nonfinite, hist=hist, norms=norms, total_norm=total,
                       clip_coef=clip_coef, numel=numel)


def _accumulate_on_each_device(grads, p, num_bins, min_exp):
    positions_by_device: dict[torch.device, list[int]] = {}
    for position, grad in enumerate(grads):
        positions_by_device.setdefault(grad.device, []).append(position)
    if len(positions_by_device) == 1:
        return ops.accumulate_stats(grads, p, num_bins, min_exp)
    if any(map(capture.capturing, positions_by_device)):
        raise capture.capture_error(
            "gradients on several devices (this path copies index tensors from the host on "
            "every call)", "Capture one call per device, each on that device's gradients.")
    # Several devices (rare): per-device partials, gathered in order on the first device.
    first_device = grads[0].device
    n = len(grads)
    outputs = (
        torch.empty(n, dtype=torch.float64, device=first_device),
        torch.empty(n, dtype=torch.int64, device=first_device),
        torch.empty(n, num_bins, dtype=torch.int64, device=first_device),
    )
    for positions in positions_by_device.values():
        parts = ops.accumulate_stats([grads[i] for i in positions], p, num_bins, min_exp)
        index = int64_on(positions, first_device)
        for output, part in zip(outputs, parts):
            # A copy to the CPU must block: the CPU reads it right away.
            part = part.to(first_device, non_blocking=first_device.type != "cpu")
            output.index_copy_(0, index, part)
    return outputs


# Element counts for calls without a plan (the reference backend, several devices), by
# (counts, device); those a CUDA graph captured are pinned rather than evicted.
_numel_tensors = DeviceCache(16)


def _numel_of(grads: list[torch.Tensor], route: dispatch.Route | None) -> torch.Tensor:
    """The gradients' element counts, a new int64 tensor on the first one's device."""
    if route is not None and route.plan is not None:
        return route.plan.numel.clone()  # the plan's key fixes every shape
    device = grads[0].device
    if device.type == "cpu" and not capture.capturing(device):
        listing = route.cpu_listing if route is not None else None
        numel = native.numel_tensor(grads, listing)  # read in C++; None without it
        if numel is not None:
            return numel
    # map() reads the counts at C speed: a generator cost 1.5 ms at 4,500 gradients.
    return _numel_tensor(tuple(map(torch.Tensor.numel, grads)), device).clone()


def _numel_tensor(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    numel = _numel_tensors.get((numels, device))
    if numel is not None:
        return numel
    if capture.capturing(device):
        raise capture.capture_error("no cached element-count tensor for these gradients")
    numel = int64_on(list(numels), device)
    return _numel_tensors.add((numels, device), numel, device, [numel])


@no_grad
def grad_stats(
    parameters: ParametersLike,
    norm_type: float = 2.0,
    *,
    max_norm: float | None = None,
    histogram: bool = True,
    num_bins: int = 64,
    min_exp: int = -40,
    process_group=None,
) -> GradStats:
    r"""Per-gradient norms, non-finite counts and log2-magnitude histograms in one pass.

    Every gradient is read once, by one fused kernel launch per device and dtype (norm
    types 0, p < 0 and -inf add torch's own per-tensor norms). Results stay on the device:
    nothing here waits for the GPU.

    Args:
        parameters (nn.Module, Iterable[(str, Tensor)], Iterable[Tensor] or Tensor): the
            parameters whose ``.grad`` to read; parameters without a gradient are skipped.
            Names are kept when given (a module or ``named_parameters()`` pairs).
        norm_type (float): type of the p-norm, ``'inf'`` for the infinity norm. Default: 2.0
        max_norm (float, optional): when given, also clip the gradients in place exactly as
            :func:`gradstats.fused_clip_grad_norm_` would, from the same pass.
        histogram (bool): compute the histogram. Default: True
        num_bins (int): histogram columns, including column 0 for exact zeros. Default: 64
        min_exp (int): the exponent of column 1: it counts ``2^min_exp <= |x| < 2^(min_exp+1)``
            (and everything smaller but non-zero). Default: -40
        process_group (ProcessGroup, optional): the group plain gradients are sharded
            over by hand (ZeRO-style flat buffers): their partials are summed over it.
            ``DTensor`` gradients are combined over their own mesh without it. Default: None

    Returns:
        GradStats: device tensors, one row per gradient. With ``DTensor`` gradients or a
        ``process_group``, plain tensors holding the global figures, the same on every rank.

    Example::

        >>> loss.backward()
        >>> stats = gradstats.grad_stats(model, max_norm=1.0)
        >>> stats.total_norm, stats.nonfinite.sum()
    """
    p = parse_norm_type(norm_type)
    max_norm_value = math.inf if max_norm is None else non_negative_float("max_norm", max_norm)
    if histogram:
        check_histogram_range(num_bins, min_exp)
    params, param_names = named_items(parameters)
    grads, names, route, sharding = local_gradients_and_route(params, param_names,
                                                              process_group)
    check_norm_inputs(grads, names, "parameter", p, params, route and route.dtypes)
    if max_norm is not None:
        check_updatable(grads, names, params, route and route.all_contiguous)
    stats = collect_stats(grads, names, p, max_norm=max_norm_value, histogram=histogram,
                          num_bins=num_bins, min_exp=min_exp, route=route, sharding=sharding)
    if max_norm_value == math.inf:  # nothing to clip, as in clip.py: the factor applied is 1
        stats.clip_coef.fill_(1.0)
    elif grads:
        targets = grads if sharding is None else sharding.targets
        ops.scale_(targets, stats.clip_coef, route if targets is grads else None)
    if max_norm is None:
        stats.clip_coef = None
    return stats


def collect_stats(
    grads: list[torch.Tensor],
    names: list[str] | None,
    p: float,
    *,
    max_norm: float,
    histogram: bool,
    num_bins: int,
    min_exp: int,
    route: dispatch.Route | None = None,
    sharding: distributed.ShardedLayout | None = None,
) -> GradStats:
    """``grad_stats`` on checked inputs, without touching the gradients: ``clip_coef`` is
    the coefficient clipping to ``max_norm`` (``inf``: none) would apply. ``route``: this
    call's ``ops.route(grads)``, when the caller has it. ``sharding``: ``grads`` are its
    local tensors, and the statistics are combined across ranks."""
    if not grads:
        return _empty_stats(p, num_bins, min_exp, histogram, names, clipped=True)
    bins = num_bins if histogram else 0
    numel = _numel_of(grads, route)
    result = fused_pass(grads, p, num_bins=bins, min_exp=min_exp, max_norm=max_norm,
                        route=route, sharding=sharding, numel=numel)
    return GradStats(
        norms=result.norms,
        total_norm=result.total_norm,
        nonfinite=result.nonfinite,
        hist=result.hist if histogram else None,
        numel=result.numel,
        names=names,
        clip_coef=result.clip_coef,
        norm_type=p,
        num_bins=num_bins,
        min_exp=min_exp,
    )


def _empty_stats(p, num_bins, min_exp, histogram, names, clipped) -> GradStats:
    return GradStats(
        norms=torch.zeros(0),
        total_norm=torch.tensor(0.0),
        nonfinite=torch.zeros(0, dtype=torch.int64),
        hist=torch.zeros(0, num_bins, dtype=torch.int64) if histogram else None,
        numel=torch.zeros(0, dtype=torch.int64),
        names=names,
        clip_coef=torch.tensor(1.0) if clipped else None,
        norm_type=p,
        num_bins=num_bins,
        min_exp=min_exp,
    )
