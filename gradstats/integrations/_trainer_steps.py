"""Records under the trainer's step numbers: shared by the framework callbacks.

``GradMonitor`` numbers its records by its own count of ``step()`` calls. A trainer has its
own step (resumed runs start past 0; the Hugging Face Trainer counts an update once it is
done), and on a GPU a record is written a step or so after its step ran, when the trainer's
counter has moved on. So each callback tells this sink, at the step itself, which trainer
step the monitor's step is; records are rewritten with it before any sink sees them.
"""
from __future__ import annotations

import dataclasses
from ..monitor import MAX_IN_FLIGHT, GradMonitor
from ..record import StepRecord
from ..sinks import make_sink


class TrainerStepSink:
    """Forwards records to ``sinks`` with ``record.step`` set to the trainer's step."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        self._trainer_steps: dict[int, int] = {}  # monitor step -> trainer step

    def expect(self, monitor_step: int, trainer_step: int) -> None:
        """Record the trainer's step for the monitor step about to run."""
        self._trainer_steps[monitor_step] = trainer_step
        # Bounded: a step older than the in-flight limit has been written already (records
        # of steps that are not logged are never asked for, so nothing else removes them).
        self._trainer_steps.pop(monitor_step - MAX_IN_FLIGHT - 1, None)

    def trainer_step(self, monitor_step: int) -> int:
        return self._trainer_steps.get(monitor_step, monitor_step)

    def write(self, record: StepRecord) -> None:
        record = dataclasses.replace(record, step=self.trainer_step(record.step))
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


def make_sinks(specs) -> list:
    """gradstats sinks from one spec or a list of them (``None``: none)."""
    if specs is None:
        return []
    if isinstance(specs, str) or callable(getattr(specs, "write", None)):
        specs = [specs]
    sinks = []
    try:
        for spec in specs:
            sinks.append(make_sink(spec))
    except BaseException:  # close the files already opened
        for sink in sinks:
            getattr(sink, "close", lambda: None)()
        raise
    return sinks


def translate_callback(on_nonfinite, steps: TrainerStepSink):
    """A callable ``on_nonfinite`` called with the trainer's step; other values unchanged."""
    if not callable(on_nonfinite):
        return on_nonfinite

    def on_nonfinite_at_trainer_step(step: int, found: dict[str, int]) -> None:
        on_nonfinite(steps.trainer_step(step), found)
    return on_nonfinite_at_trainer_step


def check_monitor_options(**options) -> None:
    """Raise now, when the callback is made, for options ``GradMonitor`` would reject at
    the start of training: a monitor over nothing runs its own checks and messages."""
    GradMonitor([], sinks=[], **options).close()
