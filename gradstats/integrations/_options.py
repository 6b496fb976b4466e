"""Checking and building what the framework callbacks hand to ``GradMonitor``."""
from __future__ import annotations

from ..monitor import GradMonitor
from ..sinks import make_sink


def check_monitor_options(**options) -> None:
    """Raise now, when the callback is made, for options ``GradMonitor`` would reject at
    the start of training: a monitor over nothing runs its own checks and messages."""
    GradMonitor([], sinks=[], **options).close()


def make_sinks(specs) -> list:
    """gradstats sinks from one spec or a list of them (``None``: none), closing the ones
    already opened when a later one cannot be made."""
    if specs is None:
        return []
    if isinstance(specs, str) or callable(getattr(specs, "write", None)):
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
