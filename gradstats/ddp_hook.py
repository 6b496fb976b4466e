"""``DDPStatsHook``: the fused statistics of each DDP bucket, taken as soon as it is averaged.

DDP averages gradients bucket by bucket while backward is still running. This
communication hook wraps the hook that averages (by default ``allreduce_hook``) and chains
the fused statistics pass onto its future: each averaged bucket is read once, as
per-parameter views of the flat bucket, while later buckets are still being computed. The
per-parameter partials (power, NaN/Inf count, histogram) wait in the hook; at the optimizer
step only the finalize (norms, total norm, clip coefficient) and the scale pass remain.

The partials are used only when they describe the gradients as they are at the call
(:attr:`DDPStatsHook.ready`):

- every bucket of the last backward reported (a ``no_sync()`` step runs no hook at all; a
  sparse gradient's bucket never does);
- no forward through the DDP model started since that backward began;
- every gradient is the tensor it was when DDP finished that backward, with the same
  version counter: an in-place torch op after backward (a manual edit, a clip that scaled)
  or a new gradient (``zero_grad``, accumulation) shows. ``GradScaler.unscale_``, whose op
  bumps no counter, is counted where it is called (see ``_GradScalerWatch``): with a
  GradScaler the calls therefore read ``p.grad`` again, and the hook only adds work. An
  edit through ``.data`` leaves the counter alone and is not seen: the partials then
  describe the gradients as averaged;
- every parameter holding a gradient sits in a bucket (DDP skips ignored parameters).

Otherwise the methods run the post-backward pass on ``p.grad``: the same results, for one
more read of the gradients. Averaged buckets hold the same values on every rank, so every
rank takes the same decisions (NaN/Inf, clip coefficient) without communication.
"""
from __future__ import annotations

import functools
import math
import operator
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .checks import check_histogram_range, check_updatable, non_negative_float
from .clip import _raise_if_nonfinite, fused_clip_grad_norm_, get_total_norm
from .host_path import gradients_and_route
from .norms import NormKind, norm_kind, parse_norm_type
from .params import norm_result_dtype, unwrap_model
from .stats import GradStats, finalize_partials, grad_stats

__all__ = ["DDPStatsHook"]

# Gathers kept per hook: one per (bucket layouts, kept set). A model whose unused
# parameters vary (a mixture of experts under find_unused_parameters=True) can give a new
# kept set every step; the oldest gather goes first beyond this many.
MAX_CACHED_GATHERS = 32

_GRAD_OF = operator.attrgetter("grad")
_VERSION_OF = torch.Tensor._version.__get__  # read at C speed under map()


@dataclass(frozen=True)
class _BucketLayout:
    """Where each parameter of one bucket lies in its flat buffer, found once per layout
    (DDP rebuilds its buckets once, after the first iteration)."""

    pieces: tuple[int, ...]  # split sizes covering the buffer: parameters, gaps, tail
    param_pieces: tuple[int, ...] | None  # which pieces are parameters (None: all of them)
    positions: tuple[int, ...]  # each parameter's position in the model's parameter order


@dataclass
class _BucketPartials:
    layout: _BucketLayout
    power: torch.Tensor
    nonfinite: torch.Tensor
    hist: torch.Tensor


@dataclass(frozen=True)
class _Snapshot:
    """The gradients as DDP left them at the end of one complete backward."""

    generation: int
    kept: tuple[int, ...] | None  # positions of the parameters with a gradient; None: all
    ids: tuple[int, ...]
    versions: tuple[int, ...]
    unscales: int  # _GradScalerWatch.calls then


class _GradScalerWatch:
    """Counts ``GradScaler.unscale_`` calls in this process. unscale_ multiplies the
    gradients in place by an op that bumps no version counter, so a snapshot cannot see it
    otherwise, and partials taken before it would clip by the scaled norm (by the loss
    scale, ~65536x too large). Every hook wraps the ``unscale_`` of
    ``torch.amp.GradScaler`` (which ``torch.cuda.amp.GradScaler`` inherits) and of each
    subclass that defines its own (FSDP's ``ShardedGradScaler`` does, without calling
    torch's), once per class; subclasses defined later are wrapped as they are created.
    The wrapper counts, then calls the class's own. A subclass's unscale_ that calls its
    parent's counts twice: only a change of the count matters."""

    calls = 0

    @classmethod
    def install(cls) -> None:
        base = getattr(torch.amp, "GradScaler", None)
        if base is None:
            return
        pending = [base]
        while pending:  # the subclasses defined so far (ShardedGradScaler, once imported)
            scaler = pending.pop()
            cls._count_calls_of(scaler)
            pending.extend(scaler.__subclasses__())
        if "__init_subclass__" not in base.__dict__:  # and those defined from now on
            def count_subclass_calls(subclass, **kwargs):
                super(base, subclass).__init_subclass__(**kwargs)
                cls._count_calls_of(subclass)

            base.__init_subclass__ = classmethod(count_subclass_calls)

    @classmethod
    def _count_calls_of(cls, scaler: type) -> None:
        unscale = scaler.__dict__.get("unscale_")  # its own, not an inherited one
        if unscale is None or getattr(unscale, "_gradstats_counted", False):
            return

        @functools.wraps(unscale)
        def counted_unscale_(self, optimizer):
            cls.calls += 1  # before: an unscale_ that fails may have scaled some gradients
            return unscale(self, optimizer)

        counted_unscale_._gradstats_counted = True
        scaler.unscale_ = counted_unscale_


def _stats_comm_hook(state, bucket):
    # No annotations: DDP compares them with dist.GradBucket and Future[Tensor] objects, and
    # this module's annotations are strings (``from __future__ import annotations``).
    return state._on_bucket(bucket)


class DDPStatsHook:
    r"""A DDP communication hook that computes gradient statistics per bucket during backward.

    Registers itself on ``ddp_model`` (``register_comm_hook``; DDP takes one hook, for
    good). Each bucket is averaged by ``wrapped_hook`` (default: torch's
    ``allreduce_hook`` on the model's process group, which is what DDP does without a
    hook); as soon as its average is ready, one fused pass reads it and keeps the
    per-parameter partials. :meth:`clip_grad_norm_`, :meth:`get_total_norm` and
    :meth:`grad_stats` then only finalize and scale; they read ``p.grad`` again only when
    the partials do not describe the current gradients (see :attr:`ready`).

    Args:
        ddp_model (DistributedDataParallel): the model; rows follow its module's
            ``named_parameters()``, under those names.
        norm_type (float): type of the p-norm, ``'inf'`` for the infinity norm; any p > 0.
            Default: 2.0
        histogram (bool): also count the log2-magnitude histograms (for
            :meth:`grad_stats`); pass False when only clipping. Default: True
        num_bins (int): histogram columns, as in :func:`gradstats.grad_stats`. Default: 64
        min_exp (int): exponent of histogram column 1, as in
            :func:`gradstats.grad_stats`. Default: -40
        wrapped_hook (callable, optional): the communication hook that averages each bucket,
            ``hook(state, bucket) -> Future[Tensor]`` (e.g. ``fp16_compress_hook``); the
            statistics read what its future returns. Default: ``allreduce_hook``
        wrapped_state (object, optional): the ``state`` passed to ``wrapped_hook``.
            Default: the model's process group

    Example::

        >>> model = DDP(net, gradient_as_bucket_view=True)
        >>> stats_hook = gradstats.DDPStatsHook(model, histogram=False)
        >>> loss.backward()                                  # statistics taken per bucket
        >>> total = stats_hook.clip_grad_norm_(max_norm=1.0)  # finalize + scale only
        >>> optimizer.step()
    """

    def __init__(
        self,
        ddp_model: nn.parallel.DistributedDataParallel,
        norm_type: float = 2.0,
        *,
        histogram: bool = True,
        num_bins: int = 64,
        min_exp: int = -40,
        wrapped_hook=None,
        wrapped_state=None,
    ) -> None:
        if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
            raise TypeError("ddp_model must be a torch.nn.parallel.DistributedDataParallel, "
                            f"got {type(ddp_model).__name__}")
        p = parse_norm_type(norm_type)
        if norm_kind(p) == NormKind.COMPOSED:
            raise ValueError(
                f"DDPStatsHook needs a norm type > 0 or inf (per-bucket partials add up only "
                f"for those), got {p}; use gradstats.grad_stats after backward instead")
        if histogram:
            check_histogram_range(num_bins, min_exp)
        if wrapped_hook is None:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            wrapped_hook = default_hooks.allreduce_hook
            if wrapped_state is None:
                wrapped_state = ddp_model.process_group
        elif not callable(wrapped_hook):
            raise TypeError(f"wrapped_hook must be callable, got {type(wrapped_hook).__name__}")
        self.norm_type = p
        self.histogram = bool(histogram)
        self.num_bins = num_bins
        self.min_exp = min_exp
        self._bins = num_bins if histogram else 0
        self._wrapped_hook = wrapped_hook
        self._wrapped_state = wrapped_state
        named = list(unwrap_model(ddp_model).named_parameters())
        # Frozen ones are fine: DDP leaves them out of its buckets.
        complex_names = [name for name, param in named
                         if param.is_complex() and param.requires_grad]
        if complex_names:
            # DDP averages a complex gradient as its real pairs, while the bucket's views
            # count complex elements: the partials would describe half of each gradient.
            raise TypeError("DDPStatsHook does not support complex parameters, got "
                            + ", ".join(repr(name) for name in complex_names)
                            + "; use gradstats' functions after backward instead")
        self._names = [name for name, _ in named]
        self._params = [param for _, param in named]
        self._position_of = {id(param): i for i, param in enumerate(self._params)}
        # Bounded: DDP's initial buckets and its one rebuild.
        self._layouts: dict[tuple, _BucketLayout] = {}  # (index, parameter ids) -> layout
        # (layout ids, kept set, device) -> gather; at most MAX_CACHED_GATHERS, oldest out.
        self._gathers: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._lock = threading.Lock()  # bucket callbacks may finish on other threads
        self._generation = 0
        self._partials: dict[int, _BucketPartials] = {}
        self._bucket_count: int | None = None
        self._forwards = 0
        self._forwards_at_backward = -1
        self._snapshot: _Snapshot | None = None
        # The comm hook first: DDP refuses a second one, and then nothing is left registered.
        ddp_model.register_comm_hook(self, _stats_comm_hook)
        _GradScalerWatch.install()
        ddp_model.register_forward_pre_hook(self._count_forward)

    # -- during backward ----------------------------------------------------------------
    def _count_forward(self, module, args) -> None:
        self._forwards += 1

    def _on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        index = bucket.index()
        if index == 0:  # DDP launches buckets in index order: a new backward begins
            self._start_backward()
        generation = self._generation
        if bucket.is_last():
            self._bucket_count = index + 1
        if bucket.buffer().layout != torch.strided:
            # A sparse gradient (nn.Embedding(sparse=True)) gets a bucket of its own, with no
            # flat buffer to split: its partials stay missing, so the calls read p.grad.
            return self._wrapped_hook(self._wrapped_state, bucket)
        layout = self._layout_of(bucket)
        future = self._wrapped_hook(self._wrapped_state, bucket)
        return future.then(functools.partial(self._read_bucket, generation, index, layout))

    def _start_backward(self) -> None:
        with self._lock:
            self._generation += 1
            self._partials = {}
            self._bucket_count = None
            self._snapshot = None
            self._forwards_at_backward = self._forwards
        try:
            # Runs at the end of backward, before DDP's own final callback (queued once the
            # last bucket is launched); it queues the snapshot behind DDP's, which copies the
            # averages into the gradients.
            torch.autograd.Variable._execution_engine.queue_callback(self._after_buckets)
        except RuntimeError:
            pass  # not inside backward (DDP's Join): no snapshot, so the partials are unused

    def _layout_of(self, bucket: dist.GradBucket) -> _BucketLayout:
        params = bucket.parameters()
        key = (bucket.index(), tuple(map(id, params)))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._new_layout(bucket, params)
        return layout

    def _new_layout(self, bucket: dist.GradBucket, params: list[torch.Tensor]) -> _BucketLayout:
        buffer = bucket.buffer()
        pieces, param_pieces, cursor = [], [], 0
        for grad in bucket.gradients():  # views of the buffer, in the bucket's order
            offset = grad.storage_offset() - buffer.storage_offset()
            if offset > cursor:
                pieces.append(offset - cursor)
            param_pieces.append(len(pieces))
            pieces.append(grad.numel())
            cursor = offset + grad.numel()
        if buffer.numel() > cursor:
            pieces.append(buffer.numel() - cursor)
        # -1: a parameter missing from the model's named_parameters() (none in practice);
        # its row is never gathered.
        positions = tuple(self._position_of.get(id(param), -1) for param in params)
        packed = len(param_pieces) == len(pieces)
        return _BucketLayout(tuple(pieces), None if packed else tuple(param_pieces), positions)

    def _read_bucket(self, generation: int, index: int, layout: _BucketLayout,
                     future: torch.futures.Future):
        value = future.value()
        averaged = value[0] if isinstance(value, (list, tuple)) else value
        # Grad mode is thread-local: this may run on the communication library's thread.
        with torch.no_grad():
            views = averaged.reshape(-1).split_with_sizes(layout.pieces)
            if layout.param_pieces is not None:
                views = [views[i] for i in layout.param_pieces]
            if views:
                power, nonfinite, hist = ops.accumulate_stats(
                    list(views), self.norm_type, self._bins, self.min_exp)
                with self._lock:
                    if generation == self._generation:
                        self._partials[index] = _BucketPartials(layout, power, nonfinite, hist)
        return value

    def _after_buckets(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._take_snapshot)

    def _take_snapshot(self) -> None:
        with self._lock:
            generation, count = self._generation, self._bucket_count
            complete = count is not None and set(self._partials) == set(range(count))
        if not complete:
            return
        grads = list(map(_GRAD_OF, self._params))
        kept = None
        if any(grad is None for grad in grads):
            kept = tuple(i for i, grad in enumerate(grads) if grad is not None)
            grads = [grads[i] for i in kept]
        self._snapshot = _Snapshot(generation, kept, tuple(map(id, grads)),
                                   tuple(map(_VERSION_OF, grads)), _GradScalerWatch.calls)

    # -- at the step -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether the partials describe the gradients as they are now, so the next call
        only finalizes (and scales); False means it reads ``p.grad`` again. Changes that
        leave the version counters alone (edits through ``.data``) are not seen;
        ``GradScaler.unscale_`` is."""
        grads = [grad for grad in map(_GRAD_OF, self._params) if grad is not None]
        return bool(grads) and self._usable_partials(grads) is not None

    def _usable_partials(self, grads: list[torch.Tensor]):
        """``(power, nonfinite, hist, numel)`` of ``grads`` (the non-None gradients in model order)
        from the last backward's buckets, or None when they do not describe ``grads``."""
        snapshot = self._snapshot
        if (snapshot is None or snapshot.generation != self._generation
                or snapshot.unscales != _GradScalerWatch.calls
                or self._forwards != self._forwards_at_backward
                or len(grads) != len(snapshot.ids)
                or tuple(map(id, grads)) != snapshot.ids
                or tuple(map(_VERSION_OF, grads)) != snapshot.versions):
            return None
        partials = [self._partials[i] for i in range(len(self._partials))]
        gather = self._gather_of(tuple(part.layout for part in partials), snapshot.kept,
                                 partials[0].power.device)
        if gather is None:
            return None
        rows, numel = gather
        power = torch.cat([part.power for part in partials]).index_select(0, rows)
        nonfinite = torch.cat([part.nonfinite for part in partials]).index_select(0, rows)
        hist = torch.cat([part.hist for part in partials]).index_select(0, rows)
        return power, nonfinite, hist, numel

    def _gather_of(self, layouts: tuple[_BucketLayout, ...], kept: tuple[int, ...] | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Which rows of the buckets' concatenated partials hold the kept parameters, in
        model order, and those parameters' element counts; cached by bucket layouts, kept
        set and device. None when a parameter with a gradient is in no bucket."""
        key = (tuple(map(id, layouts)), kept, device)
        if key in self._gathers:
            return self._gathers[key]
        row_of = {}
        for row, position in enumerate(p for layout in layouts for p in layout.positions):
            row_of[position] = row
        wanted = range(len(self._params)) if kept is None else kept
        gather = None
        if all(position in row_of for position in wanted):
            rows = torch.tensor([row_of[position] for position in wanted], dtype=torch.int64)
            numel = torch.tensor([self._params[position].numel() for position in wanted],
                                 dtype=torch.int64)
            gather = rows.to(device), numel.to(device)
        if len(self._gathers) >= MAX_CACHED_GATHERS:
            del self._gathers[next(iter(self._gathers))]
        self._gathers[key] = gather
        return gather

    def _named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self._names, self._params))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, error_if_nonfinite: bool = False) -> torch.Tensor:
        r"""Clip the gradient norm of the model's parameters, as
        :func:`torch.nn.utils.clip_grad_norm_` with the hook's ``norm_type`` would, from the
        partials taken during backward (or, when not :attr:`ready`, by
        :func:`gradstats.fused_clip_grad_norm_`).

        Args:
            max_norm (float): max norm of the gradients (non-negative)
            error_if_nonfinite (bool): if True, an error naming the parameters holding
                NaN/Inf is raised (on every rank: they hold the same averages) when the
                total norm is non-finite; nothing is modified then. Default: False

        Returns:
            Total norm of the parameter gradients (viewed as a single vector).
        """
        max_norm = non_negative_float("max_norm", max_norm)
        grads, names, route = gradients_and_route(self._params, self._names)
        partials = self._usable_partials(grads) if grads else None
        if partials is None or route is None:
            return fused_clip_grad_norm_(self._named_parameters(), max_norm, self.norm_type,
                                         error_if_nonfinite)
        check_updatable(grads, names, None, route and route.all_contiguous)
        result = finalize_partials(*partials[:3], self.norm_type, max_norm,
                                   self._norms_dtype(route.dtypes))
        total = result.total_norm.to(norm_result_dtype(grads, route.dtypes))
        if error_if_nonfinite:
            _raise_if_nonfinite(result, total, self.norm_type, names, "parameter")
        if max_norm != math.inf:  # inf: no clipping asked for, as in gradstats.clip
            ops.scale_(grads, result.clip_coef, route)
        return total

    @torch.no_grad()
    def get_total_norm(self, error_if_nonfinite: bool = False) -> torch.Tensor:
        r"""The total ``norm_type`` norm of the model's gradients, as
        :func:`torch.nn.utils.get_total_norm` of them would return it.

        Args:
            error_if_nonfinite (bool): raise, naming the parameters holding NaN/Inf, when
                the total norm is non-finite. Default: False
        """
        grads, names, route = gradients_and_route(self._params, self._names)
        partials = self._usable_partials(grads) if grads else None
        if partials is None or route is None:
            named = [(name, param.grad) for name, param in self._named_parameters()
                     if param.grad is not None]
            return get_total_norm(named, self.norm_type, error_if_nonfinite)
        result = finalize_partials(*partials[:3], self.norm_type, math.inf,
                                   self._norms_dtype(route.dtypes))
        total = result.total_norm.to(norm_result_dtype(grads, route.dtypes))
        if error_if_nonfinite:
            _raise_if_nonfinite(result, total, self.norm_type, names, "tensor")
        return total

    @torch.no_grad()
    def grad_stats(self, max_norm: float | None = None) -> GradStats:
        r"""The :class:`GradStats` :func:`gradstats.grad_stats` would give for the model
        (with the hook's ``norm_type``, ``histogram``, ``num_bins`` and ``min_exp``),
        clipping too when ``max_norm`` is given.

        Args:
            max_norm (float, optional): clip the gradients in place to this total norm,
                from the same partials. Default: None
        """
        max_norm_value = math.inf if max_norm is None else non_negative_float("max_norm",
                                                                              max_norm)
        grads, names, route = gradients_and_route(self._params, self._names)
        partials = self._usable_partials(grads) if grads else None
        if partials is None or route is None:
            return grad_stats(self._named_parameters(), self.norm_type, max_norm=max_norm,
                              histogram=self.histogram, num_bins=self.num_bins,
                              min_exp=self.min_exp)
        check_updatable(grads, names, None, route and route.all_contiguous)
        result = finalize_partials(*partials[:3], self.norm_type, max_norm_value,
                                   self._norms_dtype(route.dtypes))
        if max_norm_value != math.inf:
            ops.scale_(grads, result.clip_coef, route)
        clip_coef = None
        if max_norm is not None:
            clip_coef = result.clip_coef
            if max_norm_value == math.inf:
                clip_coef.fill_(1.0)  # nothing clipped, as in gradstats.grad_stats
        return GradStats(
            norms=result.norms,
            total_norm=result.total_norm,
            nonfinite=result.nonfinite,
            hist=result.hist if self.histogram else None,
            numel=partials[3].clone(),  # the cached counts stay private
            names=names,
            clip_coef=clip_coef,
            norm_type=self.norm_type,
            num_bins=self.num_bins,
            min_exp=self.min_exp,
        )

    @staticmethod
    def _norms_dtype(dtypes) -> torch.dtype:
        return torch.float64 if torch.float64 in dtypes else torch.float32
