"""Steps on their way from the device to the sinks.

``GradMonitor.step`` queues non-blocking copies of a step's statistics into host memory and
records an event behind them; a later step (or ``flush``/``close``) turns every step whose
copies have landed into a :class:`StepRecord` for the sinks, oldest first. Nothing here waits
for the GPU except ``drain(wait=True)`` and a queue grown to ``MAX_IN_FLIGHT``.
"""
from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Callable

import torch

from .activations import ActivationSnapshot
from .record import build_record, nonzero_named
from .stats import GradStats

# Host copies allowed in flight before push() waits for the oldest: bounds pinned memory
# when the host runs far ahead of the GPU (it rarely gets more than a step or two ahead).
MAX_IN_FLIGHT = 64


@dataclasses.dataclass
class InFlight:
    """One step's statistics on their way to the host."""

    step: int
    host: GradStats  # host copies: the counts always, norms with a sink, histograms on the grid
    logged: bool  # on the log_every/hist_every grid
    overflow: torch.Tensor | None  # GradScaler's flag for this step, on the host
    activations: ActivationSnapshot | None  # host copies, every step with tracking
    ready: Callable[[], bool]
    wait: Callable[[], None]


class RecordQueue:
    """Steps whose statistics are being copied to the host, oldest first. Each one that
    has landed is written (``write(record)``, on logged steps, and on any other step whose
    gradients or tracked activations held NaN/Inf) and its non-zero NaN/Inf counts go to
    ``on_landed(step, {name: count}, origin)``, in step order (``origin``: where the
    activations say the NaN/Inf was born, or None).

    Off-grid non-finite steps are decided on the host once the copies have landed, so every
    step copies its norms and counts (a few bytes per parameter, next to the counts it
    copied anyway), never its histograms; a clean step costs no sync.

    ``on_landed`` is a weak method: the exit-time flush keeps the queue (and the sinks)
    alive, not the monitor. ``write`` None: no sink, so no record is built at all."""

    def __init__(self, write: Callable | None, on_landed: weakref.WeakMethod):
        self.write = write
        self.on_landed = on_landed
        self.in_flight: collections.deque[InFlight] = collections.deque()

    def push(self, step: int, stats: GradStats, logged: bool, clipped: bool,
             overflow: torch.Tensor | None,
             activations: ActivationSnapshot | None = None) -> None:
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            self._land(self.in_flight.popleft(), wait=True)
        writing = self.write is not None  # no sink: copy only the counts
        host = _to_host(stats, logged and writing, writing, clipped)
        host_overflow = _host_copy(overflow)  # queued before the fence, so it covers this too
        host_activations = activations.to_host() if activations else None
        ready, wait = copy_fence(stats.nonfinite.device)
        self.in_flight.append(InFlight(step, host, logged, host_overflow, host_activations,
                                       ready, wait))

    def drain(self, wait: bool = False) -> None:
        while self.in_flight and (wait or self.in_flight[0].ready()):
            self._land(self.in_flight.popleft(), wait)

    def _land(self, item: InFlight, wait: bool) -> None:
        if wait:
            item.wait()
        overflowed = item.overflow is not None and bool(item.overflow)
        # GradScaler's skipped steps routinely hold Inf: no alarm, and off the grid no record.
        found = {} if overflowed else nonzero_named(item.host.names, item.host.nonfinite)
        activations = (item.activations.to_record(item.step)
                       if item.activations is not None and (
                           item.logged or item.activations.has_nonfinite()) else None)
        origin = None if overflowed or activations is None else activations.nonfinite_origin
        off_grid_nonfinite = not overflowed and bool(found or origin)
        if self.write is not None and (item.logged or off_grid_nonfinite):
            record = build_record(item.step, item.host)
            record.activations = activations
            self.write(record)
        on_landed = self.on_landed()
        if on_landed is not None:  # None: the monitor is gone and this is the exit flush
            on_landed(item.step, found, origin)


def _to_host(stats: GradStats, logged: bool, writing: bool, clipped: bool) -> GradStats:
    """Host copies of what will be read: the counts always (for the alarms); with a sink
    the norms too (a non-finite step is written even off the grid); histograms on logged
    steps. From CUDA, ``non_blocking`` copies land in pinned memory and return at once; on
    the CPU the tensors are the results themselves."""
    if not writing:
        return dataclasses.replace(stats, norms=None, total_norm=None, hist=None, numel=None,
                                   clip_coef=None, nonfinite=_host_copy(stats.nonfinite))
    return dataclasses.replace(
        stats, norms=_host_copy(stats.norms), total_norm=_host_copy(stats.total_norm),
        nonfinite=_host_copy(stats.nonfinite), hist=_host_copy(stats.hist) if logged else None,
        numel=None, clip_coef=_host_copy(stats.clip_coef) if clipped else None)


def _host_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or tensor.device.type == "cpu":
        return tensor
    return tensor.to("cpu", non_blocking=True)


def copy_fence(device: torch.device):
    """``(ready, wait)`` for copies just queued on ``device``'s current stream."""
    if device.type != "cuda":
        return (lambda: True), (lambda: None)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event.query, event.synchronize
