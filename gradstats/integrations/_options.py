"""What the framework callbacks hand to ``GradMonitor``: options checked early, sink lists."""
from __future__ import annotations

from ..monitor import GradMonitor


def check_monitor_options(**options) -> None:
    """Raise now, when the callback is made, for options ``GradMonitor`` would reject at
    the start of training: a monitor over nothing runs its own checks and messages."""
    GradMonitor([], sinks=[], **options).close()


def sink_list(specs) -> list:
    """One sink spec or a list of them, as a new list (``None``: empty), for the callback to
    add its own sinks to; ``GradMonitor`` makes them."""
    if specs is None:
        return []
    if isinstance(specs, str) or callable(getattr(specs, "write", None)):
        return [specs]
    return list(specs)
