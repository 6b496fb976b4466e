"""The monitor's in-memory history of written records, for ``gradstats.diagnose(monitor)``.

Bounded twice: at most ``maxlen`` records, and histograms only in the latest histogram
record (a histogram record holds a list per parameter: 4,500 parameters x 64 bins is 288,000
Python ints, which 200 records would turn into gigabytes). Older records are kept as copies
without their histograms; the records the sinks received are never modified.
"""
from __future__ import annotations

import collections
import dataclasses

from .record import StepRecord


class RecentRecords:
    def __init__(self, maxlen: int):
        self._records: collections.deque[StepRecord] = collections.deque(maxlen=maxlen)
        self._histogram: StepRecord | None = None  # the latest record with histograms

    def add(self, record: StepRecord) -> None:
        if record.hist is None:
            self._records.append(record)
            return
        self._histogram = record
        self._records.append(dataclasses.replace(record, hist=None, module_hist=None,
                                                 bin_edges=None, min_exp=None))

    def records(self) -> list[StepRecord]:
        """The kept records, oldest first, the latest histogram record whole."""
        latest = self._histogram
        return [latest if latest is not None and r.step == latest.step else r
                for r in self._records]
