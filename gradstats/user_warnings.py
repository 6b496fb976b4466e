"""Warnings that point at the user's own line, however deep in a training framework the
monitor was called from (``optimizer.step()`` hooks, Lightning, accelerate, a sink)."""
from __future__ import annotations

import sys
import warnings

# Top-level packages between the user's code and the monitor: their frames are skipped
# (weakref: close() runs the sinks' close through a weakref.finalize).
FRAMEWORKS = frozenset({"gradstats", "torch", "accelerate", "lightning", "pytorch_lightning",
                        "transformers", "weakref"})


def warn(message: str | Warning, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the innermost frame outside ``FRAMEWORKS``."""
    warnings.warn(message, category, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    frame, level = sys._getframe(2), 2  # 2: the caller of warn()
    while frame is not None:
        package = frame.f_globals.get("__name__", "").partition(".")[0]
        if package not in FRAMEWORKS:
            return level
        frame, level = frame.f_back, level + 1
    return 2
