"""``GradMonitor``: every gradient's statistics, every step, for the cost of one fused pass.

Per step: one ``collect_stats`` pass over the model's gradients (norms, NaN/Inf counts,
histograms on histogram steps) and, when asked, the clip from the same pass. The pieces
around that pass live in their own modules:

- ``watched_params``: which parameters, re-read when the model's tree changed;
- ``record_queue``: non-blocking copies to the host, records once they landed;
- ``sinks.fanout``: every record to every sink, a failing sink reported and retried;
- ``nonfinite``: what NaN/Inf make the monitor say (``on_nonfinite``);
- ``optimizer_hooks``: ``attach``, closures, and skipping an update.

Nothing waits for the GPU unless the user asked for it (``on_nonfinite="raise"``, ``"skip"``
with an optimizer that cannot skip on the device, ``flush()``).
"""
from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import distributed, ops
from .activations import ActivationTracker
from .checks import check_histogram_range, check_norm_inputs, check_updatable, non_negative_float
from .host_path import local_gradients_and_route
from .nonfinite import NonFinitePolicy, describe, describe_origin
from .norms import parse_norm_type
from .optimizer_hooks import OptimizerHooks, hookable
from .params import ParametersLike, norm_result_dtype
from .recent_records import RecentRecords
from .record import nonzero_named
from .record_queue import RecordQueue
from .sinks import open_sinks
from .sinks.fanout import SinkFanout
from .stats import GradStats, collect_stats
from .watched_params import WatchedParameters

__all__ = ["GradMonitor"]

# A JSONL file of its own per monitor: runs/gradstats-<UTC time>-<pid>-<n>.jsonl.
DEFAULT_SINKS = ("jsonl",)

# Records kept in memory for gradstats.diagnose(monitor): a few windows of steps, bounded
# because a histogram record of a large model holds a list per parameter.
RECENT_RECORDS = 200

logger = logging.getLogger("gradstats")


class GradMonitor:
    r"""Watches a model's gradients every step: norms, NaN/Inf counts, log2 histograms,
    per parameter and per module, written to sinks without stalling the GPU.

    Args:
        model (nn.Module or Iterable[(str, Tensor)]): what to watch. For a module, the
            parameters it holds at each step (layers added, replaced or deleted later are
            followed); a list of tensors or ``(name, tensor)`` pairs is fixed. ``torch.compile``,
            ``DistributedDataParallel`` and ``DataParallel`` wrappers are looked through, so
            names match the unwrapped model.
        log_every (int): write step ``s`` when ``s % log_every == 0``, and any step whose
            gradients (or tracked activations) held NaN/Inf, once its counts have landed on
            the host (so every step copies its per-parameter norms with its counts: a few
            bytes per parameter, no sync). GradScaler's overflow steps are not written off
            the grid. Default: 1
        hist_every (int, optional): include histograms when ``s % hist_every == 0`` (such
            a step is written even off the ``log_every`` grid). Default: None (never)
        sinks (list or None): sink specs (``"jsonl:PATH"``, ``"csv:PATH"``,
            ``"jsonl+append:PATH"``, ``"tensorboard:DIR"``, ``"wandb"``, ``"logging"``, ...)
            or objects with ``write(record)``; see :mod:`gradstats.sinks`. ``None`` or
            ``[]``: none. Default: ``["jsonl"]``, a new file
            ``runs/gradstats-<UTC time>-<pid>-<n>.jsonl`` (see :attr:`paths`). A file that
            exists and is not empty is never emptied unless the spec says ``+overwrite``.
        on_nonfinite (str or callable): what a NaN/Inf gradient triggers.
            ``"warn"``: a :class:`NonFiniteGradientWarning` naming the step and parameters,
            once per run of non-finite steps, when the counts reach the host (a step or so
            later); after five, the alarms go to the ``gradstats`` logger. Under
            ``torch.distributed`` only the rank that writes (see ``all_ranks``) warns; another
            rank whose tracked activations saw where the NaN/Inf was born logs that.
            ``"raise"``: ``step()`` waits for the counts and raises ``RuntimeError`` before
            clipping, so nothing is modified (on every rank). ``"skip"``: that step's
            optimizer update becomes a no-op (needs ``optimizer=`` or :meth:`attach`; on
            every rank), and a warning as for ``"warn"``. ``"ignore"``: counts are logged,
            nothing else. A callable is called as ``fn(step, {name: count})`` for every
            step with non-finite gradients, on every rank.
            Default: ``"warn"``
        norm_type (float): order of the norms. Default: 2.0
        optimizer (Optimizer, optional): the optimizer whose update ``"skip"`` cancels.
        num_bins, min_exp (int): histogram layout, as for :func:`gradstats.grad_stats`.
        track_activations (bool): also record, per leaf module and step, the norm of its
            output ``h``, of ``dL/dh``, their NaN/Inf counts, the saturated fraction of
            sigmoid/tanh-like outputs, and where a NaN/Inf was born (see
            :mod:`gradstats.activations`), also named by ``"raise"`` and the warnings;
            hooks on the model's leaf modules, moved when its tree changes (from the step
            after the change), taken off by :meth:`close`. Needs an ``nn.Module``.
            Default: False
        process_group (ProcessGroup, optional): the group plain gradients are sharded over
            by hand, as for :func:`gradstats.grad_stats`. Default: None
        all_ranks (bool): under ``torch.distributed``, every rank opens ``sinks``, writes
            (give each rank its own paths) and warns; otherwise only global rank 0 does,
            the others open no sink and stay silent. Set it when the ranks' gradients are
            not combined (plain, unsynchronised gradients: each rank's own figures).
            Default: False

    Attributes:
        steps (int): steps taken; the next :meth:`step` is step number ``steps``.
        paths (list[Path]): the files the sinks write (the default file's name is also
            logged once at INFO on the ``gradstats`` logger).
        recent_records (list[StepRecord]): the last ``RECENT_RECORDS`` records written,
            for :func:`gradstats.diagnose`, histograms only in the latest histogram record
            (empty when the monitor has no sink).
        sinks (list): the sinks made from ``sinks``.

    With a fused optimizer (``fused=True``) ``"skip"`` hands the optimizer a device-side
    ``found_inf`` flag, as ``GradScaler`` does, and never syncs; other optimizers have their
    gradients hidden for that step, which needs one host sync on the flag. With
    ``optimizer.step(closure)``, call ``step()`` inside the closure after backward (as a
    Lightning ``on_before_optimizer_step`` callback does): the update that follows is the
    one skipped.

    Distributed training: ``DTensor`` gradients (FSDP2, tensor parallelism) and
    ``process_group=`` shards are read where they live and their statistics combined
    across ranks, so records hold the global figures under the unsharded model's names and
    ``"raise"``/``"skip"`` decide the same on every rank; under DDP the gradients are
    already identical and nothing is communicated. Create the monitor after
    ``init_process_group`` (it asks for the rank then), and call :meth:`step` on every rank.

    A sink that fails never stops training: it is reported once (a warning naming the sink
    and the error), its records are held and retried, and the other sinks go on. Steps are
    numbered in call order, also when ``step()`` is called from several threads.

    Example::

        >>> monitor = gradstats.GradMonitor(model, log_every=10, hist_every=100,
        ...                                 sinks=["jsonl:runs/grads.jsonl"])
        >>> for batch in data:
        ...     model(batch).loss.backward()
        ...     total_norm = monitor.step(max_norm=1.0)  # statistics + clipping, one pass
        ...     optimizer.step(); optimizer.zero_grad()
        >>> monitor.close()
    """

    def __init__(
        self,
        model: nn.Module | ParametersLike,
        *,
        log_every: int = 1,
        hist_every: int | None = None,
        sinks: Sequence | str | object | None = DEFAULT_SINKS,
        on_nonfinite: str | Callable[[int, dict[str, int]], None] = "warn",
        norm_type: float = 2.0,
        optimizer: torch.optim.Optimizer | None = None,
        num_bins: int = 64,
        min_exp: int = -40,
        track_activations: bool = False,
        process_group=None,
        all_ranks: bool = False,
    ):
        self.log_every = _positive_int("log_every", log_every)
        self.hist_every = None if hist_every is None else _positive_int("hist_every", hist_every)
        # The global figures are the same on every rank: the rank that writes them (rank 0,
        # or each one with all_ranks) also says what they show, once per event.
        writes = all_ranks or _is_rank_zero()
        self._nonfinite = NonFinitePolicy(on_nonfinite, announce=writes)
        self.on_nonfinite = on_nonfinite
        self.norm_type = parse_norm_type(norm_type)
        check_histogram_range(num_bins, min_exp)
        self.num_bins, self.min_exp = num_bins, min_exp
        self._watched = WatchedParameters(model)
        if track_activations and self._watched.module is None:
            raise TypeError("track_activations=True needs the model as an nn.Module, "
                            "not a list of parameters")
        if optimizer is not None:  # checked before any sink opens a file
            _check_optimizer(optimizer)
        self.steps = 0  # steps taken so far; the next step() is step number `steps`
        self._lock = threading.RLock()  # one step at a time: numbers in call order
        self._process_group = process_group
        if not writes:
            sinks = None
        self._sinks = SinkFanout(open_sinks(sinks))
        self.paths = [sink.path for sink in self._sinks.sinks if getattr(sink, "path", None)]
        if self.paths:
            logger.info("gradstats: writing gradient statistics to %s",
                        ", ".join(map(str, self.paths)))
        # The queue reaches back through a weak reference, so the exit-time finalizer
        # below keeps the sinks alive but not the monitor.
        # The records also go to a bounded in-memory history (built for the sinks anyway).
        self._recent = RecentRecords(RECENT_RECORDS)
        self._queue = RecordQueue(
            _remembering(self._sinks.write, self._recent) if self._sinks.sinks else None,
            weakref.WeakMethod(self._on_landed))
        # Made last, once nothing else can fail: its hooks are on the user's model.
        self._activations = (ActivationTracker(self._watched.module) if track_activations
                             else None)
        # At most one; held in a list the finalizer shares, so a monitor dropped without
        # close() takes its hooks off the optimizer too.
        self._held_hooks: list[OptimizerHooks] = []
        self._closer = weakref.finalize(self, _close, self._queue, self._sinks, self._held_hooks,
                                        self._activations)
        self._max_norm: float | None = None
        self._scaler_found_inf: torch.Tensor | None = None  # GradScaler's, for this step
        if optimizer is not None:
            self._hook(optimizer)

    @property
    def sinks(self) -> list:
        """The sinks, as made from the ``sinks`` argument."""
        return self._sinks.sinks

    @property
    def recent_records(self) -> list:
        """The last records written (see the class docstring)."""
        return self._recent.records()

    @property
    def _hooks(self) -> OptimizerHooks | None:
        return self._held_hooks[0] if self._held_hooks else None

    # -- the step -------------------------------------------------------------------------
    def step(self, max_norm: float | None = None) -> torch.Tensor:
        """One fused pass over the gradients: statistics, and clipping to ``max_norm``
        exactly as :func:`gradstats.fused_clip_grad_norm_` would when it is given.

        Returns:
            the total gradient norm (a device tensor, dtype as torch's clip returns).
        """
        with self._lock:
            self._check_open()
            if self.on_nonfinite == "skip" and self._hooks is None:
                raise RuntimeError(
                    "on_nonfinite='skip' needs the optimizer whose update to skip: pass "
                    "optimizer=... to GradMonitor or call monitor.attach(optimizer)")
            max_norm_value = (math.inf if max_norm is None
                              else non_negative_float("max_norm", max_norm))
            self._queue.drain()
            with torch.no_grad():
                total_norm = self._step(self.steps, max_norm_value, clip=max_norm is not None)
            self._queue.drain()  # on the CPU this step has landed already
            return total_norm

    def _step(self, step: int, max_norm: float, clip: bool) -> torch.Tensor:
        # once per step: gradients, plan, device and dtype facts
        generation = self._watched.generation
        grads, names, route, sharding = local_gradients_and_route(
            *self._watched.current(), self._process_group)
        dtypes = route and route.dtypes
        check_norm_inputs(grads, names, "parameter", self.norm_type, dtypes=dtypes)
        if clip:
            check_updatable(grads, names, all_contiguous=route and route.all_contiguous)
        with_hist = self.hist_every is not None and step % self.hist_every == 0
        logged = with_hist or step % self.log_every == 0
        stats = collect_stats(grads, names, self.norm_type, max_norm=max_norm,
                              histogram=with_hist, num_bins=self.num_bins, min_exp=self.min_exp,
                              route=route, sharding=sharding)
        self.steps += 1
        activations = self._activations.take() if self._activations is not None else None
        if self._activations is not None and self._watched.generation != generation:
            # The tree changed: hooks follow it from the next forward on (this step's
            # forward ran with the old hooks).
            self._activations.rehook(self._watched.module)
        # GradScaler's overflow flag, when it handed one to a fused optimizer: such steps
        # are skipped by the scaler and routinely hold Inf, so they raise no alarm.
        overflow, self._scaler_found_inf = self._scaler_found_inf, None
        if self.on_nonfinite == "raise":
            self._raise_if_nonfinite(step, stats, overflow, activations)
        if self.on_nonfinite == "skip":
            self._hooks.pending_skip = (stats.nonfinite.sum() > 0).to(torch.float32)
        if clip and max_norm == math.inf:  # nothing to clip, as in clip.py: the factor is 1
            stats.clip_coef.fill_(1.0)
        elif clip and grads:
            targets = grads if sharding is None else sharding.targets
            ops.scale_(targets, stats.clip_coef, route if targets is grads else None)
        self._queue.push(step, stats, logged, clipped=clip, overflow=overflow,
                         activations=activations)
        if not grads:
            return stats.total_norm
        return distributed.as_total(stats.total_norm.to(norm_result_dtype(grads, dtypes)),
                                    sharding)

    def _raise_if_nonfinite(self, step: int, stats: GradStats, overflow,
                            activations=None) -> None:
        # The one sync the user asked for: the decision needs the counts on the host.
        if not bool(stats.nonfinite.any()) or (overflow is not None and bool(overflow)):
            return
        # This step and the ones before reach the sinks before the error.
        self._queue.push(step, stats, logged=True, clipped=False, overflow=None,
                         activations=activations)
        self._queue.drain(wait=True)
        found = nonzero_named(stats.names, stats.nonfinite.cpu())
        # Read from the device: this path has waited for it already (the drain above).
        origin = activations.to_record(step).nonfinite_origin if activations else None
        raise RuntimeError(f"gradstats: non-finite gradients at step {step} in "
                           f"{describe(found)}{describe_origin(origin)}; nothing was clipped "
                           "or modified")

    def _on_landed(self, step: int, found: dict[str, int], origin: dict | None = None) -> None:
        self._nonfinite.on_landed(step, found, origin)

    def parameter_names(self) -> list[str]:
        """The names of the parameters watched now, with a gradient or not."""
        with self._lock:
            return list(self._watched.current()[1])

    # -- optimizer hooks ------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer,
               max_norm: float | None = None) -> GradMonitor:
        """Run :meth:`step` (clipping to ``max_norm`` when given) at every
        ``optimizer.step()``, so the training loop stays untouched. Steps then count
        optimizer updates: with gradient accumulation, micro-batches are not steps.

        Accelerate's ``AcceleratedOptimizer`` is looked through to the optimizer it wraps.
        ``optimizer.step(closure)`` works too: the monitor runs right after the closure has
        made the gradients, before the optimizer reads them. An optimizer that evaluates its
        closure several times per update (LBFGS) gets one monitor step (and clip) per
        evaluation; ``on_nonfinite="skip"`` cannot skip such an update and raises before
        it starts.

        The optimizer's hooks keep an attached monitor alive, logging, clipping and holding
        its files, until :meth:`close` (or the end of the ``with`` block): dropping the
        last reference is not enough.

        Under ``GradScaler`` the steps it skips for overflow are not seen with a plain
        optimizer; a fused one is stepped anyway, so they are seen and logged but raise no
        alarm. With a fused optimizer, call ``scaler.unscale_(optimizer)`` before
        ``scaler.step(optimizer)`` (as for clipping), so the statistics are of the unscaled
        gradients.
        """
        with self._lock:
            self._check_open()
            if max_norm is not None:
                non_negative_float("max_norm", max_norm)
            self._hook(optimizer)
            self._max_norm = max_norm
            self._hooks.auto_step = self._step_for_optimizer
        return self

    def _hook(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer = hookable(_check_optimizer(optimizer))
        if self._hooks is not None and self._hooks.optimizer is not optimizer:
            raise RuntimeError("this monitor is already hooked to another optimizer")
        if self._hooks is None:
            self._held_hooks.append(
                OptimizerHooks(optimizer, skipping=self.on_nonfinite == "skip"))

    def _step_for_optimizer(self, scaler_found_inf: torch.Tensor | None) -> None:
        with self._lock:
            self._scaler_found_inf = scaler_found_inf
            self.step(self._max_norm)

    # -- life cycle -----------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for every step's statistics and write them (a sync: call it sparingly)."""
        with self._lock:
            self._queue.drain(wait=True)

    def close(self) -> None:
        """Write what is still in flight, close the sinks and remove the optimizer hooks.
        Safe to call twice; also run at interpreter exit. A sink's error is reported as a
        warning, never raised."""
        with self._lock:
            self._closer()

    def _check_open(self) -> None:
        if not self._closer.alive:
            raise RuntimeError("this GradMonitor is closed")

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _close(queue: RecordQueue, sinks: SinkFanout, held_hooks: list[OptimizerHooks],
           activations: ActivationTracker | None = None) -> None:
    for hooks in held_hooks:
        hooks.remove()
    if activations is not None:
        activations.remove()
    try:
        queue.drain(wait=True)
    finally:
        sinks.close()


def _remembering(write: Callable, recent: RecentRecords) -> Callable:
    """``write``, keeping each record in ``recent`` too (no reference to the monitor, so
    the exit-time flush keeps it alive no longer than the sinks)."""
    def write_and_keep(record) -> None:
        recent.add(record)
        write(record)
    return write_and_keep


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_optimizer(optimizer):
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    return optimizer


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
