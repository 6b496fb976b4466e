"""The framework callbacks' options, checked when a callback is made."""
from __future__ import annotations

from ..monitor import GradMonitor


def check_monitor_options(**options) -> None:
    """Raise now, when the callback is made, for options ``GradMonitor`` would reject at
    the start of training: a monitor over nothing runs its own checks and messages."""
    GradMonitor([], sinks=[], **options).close()
