"""``GradMonitor``: every gradient's statistics, every step, for the cost of one fused pass.

Per step: one ``collect_stats`` pass over the model's gradients (norms, NaN/Inf counts,
histograms on histogram steps) and, when asked, the clip from the same pass. The results
are copied to pinned host memory with non-blocking copies and an event; a later ``step``
(or ``close``) turns the copies that have landed into a :class:`StepRecord` and hands it to
the sinks. Nothing waits for the GPU unless the user asked for it (``on_nonfinite="raise"``,
or ``"skip"`` with an optimizer that cannot skip on the device).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import ops
from .norms import parse_norm_type
from .params import ParametersLike, check_norm_inputs, gradients, named_items, norm_result_dtype
from .record import build_record
from .sinks import make_sink
from .stats import GradStats, check_histogram_range, collect_stats, non_negative_float

__all__ = ["GradMonitor"]

ON_NONFINITE = ("warn", "raise", "skip", "ignore")
DEFAULT_SINKS = ("jsonl:runs/gradstats.jsonl",)
# Host copies allowed in flight before step() waits for the oldest: bounds pinned memory
# when the host runs far ahead of the GPU (it rarely gets more than a step or two ahead).
MAX_IN_FLIGHT = 64


class GradMonitor:
    r"""Watches a model's gradients every step: norms, NaN/Inf counts, log2 histograms,
    per parameter and per module, written to sinks without stalling the GPU.

    Args:
        model (nn.Module or Iterable[(str, Tensor)]): what to watch. ``torch.compile``,
            ``DistributedDataParallel`` and ``DataParallel`` wrappers are looked through, so
            names match the unwrapped model.
        log_every (int): write step ``s`` when ``s % log_every == 0``. Default: 1
        hist_every (int, optional): include histograms when ``s % hist_every == 0`` (such
            a step is written even off the ``log_every`` grid). Default: None (never)
        sinks (list): sink specs (``"jsonl:PATH"``, ``"csv:PATH"``, ``"tensorboard:DIR"``,
            ``"wandb"``, ``"logging"``) or objects with ``write(record)``; see
            :mod:`gradstats.sinks`. Default: ``["jsonl:runs/gradstats.jsonl"]``
        on_nonfinite (str or callable): what a NaN/Inf gradient triggers.
            ``"warn"``: a warning naming the step and parameters, once per run of
            non-finite steps, when the counts reach the host (a step or so later).
            ``"raise"``: ``step()`` waits for the counts and raises ``RuntimeError`` before
            clipping, so nothing is modified. ``"skip"``: that step's optimizer update
            becomes a no-op (needs ``optimizer=`` or :meth:`attach`), and a warning as for
            ``"warn"``. ``"ignore"``: counts are logged, nothing else. A callable is called
            as ``fn(step, {name: count})`` for every step with non-finite gradients.
            Default: ``"warn"``
        norm_type (float): order of the norms. Default: 2.0
        optimizer (Optimizer, optional): the optimizer whose update ``"skip"`` cancels.
        num_bins, min_exp (int): histogram layout, as for :func:`gradstats.grad_stats`.

    With a fused optimizer (``fused=True``) ``"skip"`` hands the optimizer a device-side
    ``found_inf`` flag, as ``GradScaler`` does, and never syncs; other optimizers have their
    gradients hidden for that step, which needs one host sync on the flag.

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
    ):
        self.log_every = _positive_int("log_every", log_every)
        self.hist_every = None if hist_every is None else _positive_int("hist_every", hist_every)
        if not (callable(on_nonfinite) or on_nonfinite in ON_NONFINITE):
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE} or a callable, "
                             f"got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.norm_type = parse_norm_type(norm_type)
        check_histogram_range(num_bins, min_exp)
        self.num_bins, self.min_exp = num_bins, min_exp
        self._params, names = named_items(_unwrap(model))
        self._names = names or [str(i) for i in range(len(self._params))]
        self.steps = 0  # steps taken so far; the next step() is step number `steps`
        # The queue reaches back through a weak reference, so the exit-time finalizer
        # below keeps the sinks alive but not the monitor.
        self._queue = _RecordQueue(_make_sinks(sinks), weakref.WeakMethod(self._on_landed))
        self._closer = weakref.finalize(self, self._queue.close)  # flush at exit too
        self._hooks: list = []
        self._optimizer = None
        self._auto_step, self._max_norm = False, None
        self._found_inf: torch.Tensor | None = None  # "skip": this step's flag, on device
        self._scaler_found_inf: torch.Tensor | None = None  # GradScaler's, for this step
        self._undo_skip: Callable[[], None] | None = None
        self._in_nonfinite_run = False
        if optimizer is not None:
            self._hook(optimizer)

    # -- the step -------------------------------------------------------------------------
    def step(self, max_norm: float | None = None) -> torch.Tensor:
        """One fused pass over the gradients: statistics, and clipping to ``max_norm``
        exactly as :func:`gradstats.fused_clip_grad_norm_` would when it is given.

        Returns:
            the total gradient norm (a device tensor, dtype as torch's clip returns).
        """
        self._check_open()
        if self.on_nonfinite == "skip" and self._optimizer is None:
            raise RuntimeError("on_nonfinite='skip' needs the optimizer whose update to skip: "
                               "pass optimizer=... to GradMonitor or call monitor.attach(optimizer)")
        max_norm_value = math.inf if max_norm is None else non_negative_float("max_norm", max_norm)
        self._queue.drain()
        with torch.no_grad():
            total_norm = self._step(self.steps, max_norm_value, clip=max_norm is not None)
        self._queue.drain()  # on the CPU this step has landed already
        return total_norm

    def _step(self, step: int, max_norm: float, clip: bool) -> torch.Tensor:
        grads, names = gradients(self._params, self._names)
        check_norm_inputs(grads, names, "parameter")
        with_hist = self.hist_every is not None and step % self.hist_every == 0
        logged = with_hist or step % self.log_every == 0
        stats = collect_stats(grads, names, self.norm_type, max_norm=max_norm,
                              histogram=with_hist, num_bins=self.num_bins, min_exp=self.min_exp)
        self.steps += 1
        # GradScaler's overflow flag, when it handed one to a fused optimizer: such steps
        # are skipped by the scaler and routinely hold Inf, so they raise no alarm.
        overflow, self._scaler_found_inf = self._scaler_found_inf, None
        if self.on_nonfinite == "raise":
            self._raise_if_nonfinite(step, stats, overflow)
        if self.on_nonfinite == "skip":
            self._found_inf = (stats.nonfinite.sum() > 0).to(torch.float32)
        if clip and grads:
            ops.scale_(grads, stats.clip_coef)
        self._queue.push(step, stats, logged, clipped=clip, overflow=overflow)
        return stats.total_norm.to(norm_result_dtype(grads)) if grads else stats.total_norm

    def _raise_if_nonfinite(self, step: int, stats: GradStats, overflow) -> None:
        # The one sync the user asked for: the decision needs the counts on the host.
        if not bool(stats.nonfinite.any()) or (overflow is not None and bool(overflow)):
            return
        # This step and the ones before reach the sinks before the error.
        self._queue.push(step, stats, logged=True, clipped=False, overflow=None)
        self._queue.drain(wait=True)
        found = _named_counts(stats.names, stats.nonfinite.tolist())
        raise RuntimeError(f"gradstats: non-finite gradients at step {step} in "
                           f"{_describe(found)}; nothing was clipped or modified")

    def _on_landed(self, step: int, found: dict[str, int]) -> None:
        """Called in step order with each step's non-zero NaN/Inf counts, once on the host
        (empty for a step GradScaler skipped for overflow)."""
        if self.on_nonfinite == "raise":
            return  # checked at the step itself
        first_of_run = bool(found) and not self._in_nonfinite_run
        self._in_nonfinite_run = bool(found)
        if not found:
            return
        if callable(self.on_nonfinite):
            self.on_nonfinite(step, found)
        elif first_of_run and self.on_nonfinite in ("warn", "skip"):
            what = "its optimizer update was skipped" if self.on_nonfinite == "skip" else (
                "later steps are not reported until the gradients are finite again")
            warnings.warn(f"gradstats: NaN/Inf gradients first appeared at step {step} in "
                          f"{_describe(found)}; {what}", RuntimeWarning, stacklevel=5)

    # -- optimizer hooks ------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, max_norm: float | None = None) -> GradMonitor:
        """Run :meth:`step` (clipping to ``max_norm`` when given) right before every
        ``optimizer.step()``, so the training loop stays untouched. Steps then count
        optimizer updates: with gradient accumulation, micro-batches are not steps. Under
        ``GradScaler`` the steps it skips for overflow are not seen with a plain optimizer;
        a fused one is stepped anyway, so they are seen and logged but raise no alarm.
        Optimizers that take a closure (LBFGS) cannot be attached.

        Under ``GradScaler`` with a fused optimizer, call ``scaler.unscale_(optimizer)``
        before ``scaler.step(optimizer)`` (as for clipping), so the statistics are of the
        unscaled gradients.
        """
        if max_norm is not None:
            non_negative_float("max_norm", max_norm)
        self._hook(optimizer)
        self._auto_step, self._max_norm = True, max_norm
        return self

    def _hook(self, optimizer: torch.optim.Optimizer) -> None:
        if self._optimizer is not None and self._optimizer is not optimizer:
            raise RuntimeError("this monitor is already hooked to another optimizer")
        if self._optimizer is None:
            self._optimizer = optimizer
            self._hooks += [optimizer.register_step_pre_hook(self._before_optimizer_step),
                            optimizer.register_step_post_hook(self._after_optimizer_step)]

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._undo_skip = None  # left over only if the last step raised: stale, drop it
        # `args` starts with the optimizer itself; a closure is the only other argument.
        uses_closure = (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None
        if uses_closure and (self._auto_step or self._found_inf is not None):
            raise RuntimeError("gradstats: GradMonitor cannot watch an optimizer step that "
                               "takes a closure (the closure recomputes the gradients after "
                               "the monitor has read them); call monitor.step() in the closure")
        if self._auto_step:
            if getattr(optimizer, "grad_scale", None) is not None:
                raise RuntimeError(
                    "gradstats: the gradients are still multiplied by GradScaler's scale; "
                    "call scaler.unscale_(optimizer) before scaler.step(optimizer) so the "
                    "monitor sees (and clips) the true gradients")
            # Set by GradScaler for this very step (fused optimizers only).
            self._scaler_found_inf = getattr(optimizer, "found_inf", None)
            self.step(self._max_norm)
        found_inf, self._found_inf = self._found_inf, None
        if found_inf is not None:
            self._undo_skip = _skip_if_found(optimizer, found_inf)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        undo, self._undo_skip = self._undo_skip, None
        if undo is not None:
            undo()

    # -- life cycle -----------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for every step's statistics and write them (a sync: call it sparingly)."""
        self._queue.drain(wait=True)

    def close(self) -> None:
        """Write what is still in flight, close the sinks and remove the optimizer hooks.
        Safe to call twice; also run at interpreter exit."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._closer()

    def _check_open(self) -> None:
        if not self._closer.alive:
            raise RuntimeError("this GradMonitor is closed")

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclasses.dataclass
class _InFlight:
    """One step's statistics on their way to the host."""

    step: int
    host: GradStats  # host copies: the counts always, everything on written steps
    logged: bool
    overflow: torch.Tensor | None  # GradScaler's flag for this step, on the host
    ready: Callable[[], bool]
    wait: Callable[[], None]


class _RecordQueue:
    """Steps whose statistics are being copied to the host, oldest first. Each one that
    has landed becomes a record for the sinks and its counts go to ``on_landed``, in step
    order."""

    def __init__(self, sinks: list, on_landed: weakref.WeakMethod):
        self.sinks = sinks
        self.on_landed = on_landed
        self.in_flight: collections.deque[_InFlight] = collections.deque()

    def push(self, step: int, stats: GradStats, logged: bool, clipped: bool,
             overflow: torch.Tensor | None) -> None:
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            self._land(self.in_flight.popleft(), wait=True)
        host = _to_host(stats, logged, clipped)
        ready, wait = _copy_fence(stats.nonfinite.device)
        self.in_flight.append(_InFlight(step, host, logged, _host_copy(overflow), ready, wait))

    def drain(self, wait: bool = False) -> None:
        while self.in_flight and (wait or self.in_flight[0].ready()):
            self._land(self.in_flight.popleft(), wait)

    def _land(self, item: _InFlight, wait: bool) -> None:
        if wait:
            item.wait()
        if item.logged:
            record = build_record(item.step, item.host)
            for sink in self.sinks:
                sink.write(record)
        on_landed = self.on_landed()
        if on_landed is not None:  # None: the monitor is gone and this is the exit flush
            overflowed = item.overflow is not None and bool(item.overflow)
            counts = [] if overflowed else item.host.nonfinite.tolist()
            on_landed(item.step, _named_counts(item.host.names, counts))

    def close(self) -> None:
        try:
            self.drain(wait=True)
        finally:
            for sink in self.sinks:
                close = getattr(sink, "close", None)
                if close is not None:
                    close()


def _to_host(stats: GradStats, logged: bool, clipped: bool) -> GradStats:
    """Host copies of what will be read: the counts always (for the alarms), the rest on
    written steps. From CUDA, ``non_blocking`` copies land in pinned memory and return at
    once; on the CPU the tensors are the results themselves."""
    if not logged:
        return dataclasses.replace(stats, norms=None, total_norm=None, hist=None, numel=None,
                                   clip_coef=None, nonfinite=_host_copy(stats.nonfinite))
    return dataclasses.replace(
        stats, norms=_host_copy(stats.norms), total_norm=_host_copy(stats.total_norm),
        nonfinite=_host_copy(stats.nonfinite), hist=_host_copy(stats.hist), numel=None,
        clip_coef=_host_copy(stats.clip_coef) if clipped else None)


def _host_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or tensor.device.type == "cpu":
        return tensor
    return tensor.to("cpu", non_blocking=True)


def _make_sinks(specs) -> list:
    """Sinks from one spec or a list of them (``None``: the default), closing the ones
    already opened when a later one cannot be made."""
    if specs is None:
        specs = DEFAULT_SINKS
    elif isinstance(specs, str) or callable(getattr(specs, "write", None)):
        specs = [specs]
    sinks = []
    try:
        for spec in specs:
            sinks.append(make_sink(spec))
    except BaseException:
        for sink in sinks:
            getattr(sink, "close", lambda: None)()
        raise
    return sinks


def _copy_fence(device: torch.device):
    """``(ready, wait)`` for copies just queued on ``device``'s current stream."""
    if device.type != "cuda":
        return (lambda: True), (lambda: None)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event.query, event.synchronize


def _skip_if_found(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor):
    """Make this ``optimizer.step()`` a no-op when ``found_inf`` is non-zero; returns how to
    undo the arrangement after the step (or None)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # Fused optimizers skip on the device when `found_inf` != 0 (GradScaler's protocol):
        # no sync. GradScaler may have set its own flag already; either one skips.
        # The flag must be exactly 0 or 1: the fused kernels also subtract it from the
        # step counts they incremented.
        previous = getattr(optimizer, "found_inf", None)
        optimizer.found_inf = found_inf if previous is None else torch.maximum(
            previous, found_inf.to(previous.device, previous.dtype))

        def restore_found_inf():
            if previous is None:
                del optimizer.found_inf
            else:
                optimizer.found_inf = previous
        return restore_found_inf
    # Other optimizers read gradients on the host side of their loop: the decision needs
    # the flag here (the one sync of this mode). A parameter without .grad is not updated
    # (nor is its state), so hiding every gradient makes the step a no-op.
    if not bool(found_inf):
        return None
    hidden = [(p, p.grad) for group in optimizer.param_groups for p in group["params"]]
    for param, _ in hidden:
        param.grad = None

    def restore_grads():
        for param, grad in hidden:
            param.grad = grad
    return restore_grads


def _unwrap(model):
    """The module under ``torch.compile`` / DDP / DataParallel wrappers, so parameter
    names carry no ``_orig_mod.`` or ``module.`` prefix."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _named_counts(names: list[str], counts: list[int]) -> dict[str, int]:
    return {name: count for name, count in zip(names, counts) if count}


def _describe(found: dict[str, int]) -> str:
    return ", ".join(f"{name!r} ({count} NaN/Inf)" for name, count in found.items())


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value

