"""``"logging"``: one INFO line per logged step on the ``gradstats`` logger."""
from __future__ import annotations

import logging

from . import Sink

LARGEST_SHOWN = 3


class LoggingSink(Sink):
    """Logs the total norm, the clip coefficient, non-finite counts and the modules with
    the largest gradient norms, e.g.
    ``step 10: total_norm 1.234 clip_coef 0.81 nonfinite 0; largest: layers.3.mlp 0.9, ...``."""

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or logging.getLogger("gradstats")

    def write(self, record) -> None:
        largest = sorted(record.module_norms.items(), key=lambda item: -_sortable(item[1]))
        shown = ", ".join(f"{name} {norm:.4g}" for name, norm in largest[:LARGEST_SHOWN])
        clip = "" if record.clip_coef is None else f" clip_coef {record.clip_coef:.4g}"
        nonfinite = sum(record.nonfinite.values())
        message = (f"step {record.step}: total_norm {record.total_norm:.4g}{clip} "
                   f"nonfinite {nonfinite}; largest: {shown}")
        if record.nonfinite:
            message += "; NaN/Inf in " + ", ".join(record.nonfinite)
        self.logger.info(message)


def _sortable(norm: float) -> float:
    return float("inf") if norm != norm else norm  # NaN first: it is the news
