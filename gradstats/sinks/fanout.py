"""Writing each record to every sink without letting one sink harm training or the others.

A sink that raises (a full disk, a network logger down) is reported, not propagated: its
records wait in a bounded backlog and are retried, with growing gaps, on later writes, so a
transient error loses nothing and a lasting one costs little. The other sinks go on, and the
monitor's own bookkeeping for the step still happens. ``KeyboardInterrupt`` and
``SystemExit`` are not ``Exception``s and pass through.
"""
from __future__ import annotations

import collections
import logging

from ..user_warnings import warn

logger = logging.getLogger("gradstats")

# Records held per failing sink; the oldest go first when it is full. A record of a large
# model with histograms is megabytes, so this bounds memory, not history.
BACKLOG_LIMIT = 128
# A failing sink is tried again after 1, 2, 4, ... more records, at most this many.
MAX_RETRY_GAP = 64


class SinkFanout:
    """Every record to every sink, each sink guarded on its own."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)
        self._guards = [_GuardedSink(sink) for sink in self.sinks]

    def write(self, record) -> None:
        for guard in self._guards:
            guard.write(record)

    def close(self) -> None:
        """Last retry of the backlogs, then close every sink; reports, never raises
        an ``Exception``."""
        for guard in self._guards:
            guard.close()


class _GuardedSink:
    def __init__(self, sink):
        self.sink = sink
        self.backlog: collections.deque = collections.deque()
        self.failures = 0  # consecutive failed attempts
        self.wait = 0  # records to let by before the next attempt
        self.dropped = 0
        self.reported = False  # the first failure warns; later episodes only log

    def write(self, record) -> None:
        if len(self.backlog) == BACKLOG_LIMIT:
            self.backlog.popleft()
            self.dropped += 1
        self.backlog.append(record)
        if self.wait:
            self.wait -= 1
            return
        self._write_backlog()

    def _write_backlog(self) -> bool:
        held = len(self.backlog) - 1
        while self.backlog:
            try:
                self.sink.write(self.backlog[0])
            except Exception as error:  # noqa: BLE001  (any sink error: report, keep going)
                self._failed(error)
                return False
            self.backlog.popleft()
        if self.failures:
            logger.warning("gradstats: sink %s works again; %d held records written late, "
                           "%d dropped", describe_sink(self.sink), held, self.dropped)
            self.failures = self.dropped = 0
        return True

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        self.wait = min(2 ** (self.failures - 1), MAX_RETRY_GAP) - 1
        if self.failures > 1:
            return
        message = (f"gradstats: sink {describe_sink(self.sink)} failed: "
                   f"{type(error).__name__}: {error}. Training goes on; this sink's records "
                   f"are held (the last {BACKLOG_LIMIT}) and retried on later steps")
        if self.reported:
            logger.warning(message)
        else:
            self.reported = True
            warn(message)

    def close(self) -> None:
        if self.backlog and not self._write_backlog():
            warn(f"gradstats: sink {describe_sink(self.sink)} lost its last "
                 f"{len(self.backlog) + self.dropped} records at close")
        close = getattr(self.sink, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception as error:  # noqa: BLE001
            warn(f"gradstats: closing sink {describe_sink(self.sink)} failed: "
                 f"{type(error).__name__}: {error}")


def describe_sink(sink) -> str:
    path = getattr(sink, "path", None)
    return type(sink).__name__ + (f"({str(path)!r})" if path is not None else "")
