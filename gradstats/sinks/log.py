"""``"logging"``: one INFO line per logged step on the ``gradstats`` logger."""
from __future__ import annotations

import logging

from ..record import ROOT_LABEL, ROOT_MODULE
from . import Sink

LARGEST_SHOWN = 3


class LoggingSink(Sink):
    """Logs the total norm, the clip coefficient, non-finite counts and the modules with
    the largest gradient norms, e.g.
    ``step 10: total_norm 1.234 clip_coef 0.81 nonfinite 0; largest: layers.3.mlp 0.9, ...``.
    The model's own parameters show as ``<root>``; names with control characters (a
    newline) are escaped, so one record stays one line."""

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or logging.getLogger("gradstats")

    def write(self, record) -> None:
        largest = sorted(record.module_norms.items(), key=lambda item: -_sortable(item[1]))
        shown = ", ".join(f"{_module_label(name)} {norm:.4g}"
                          for name, norm in largest[:LARGEST_SHOWN])
        clip = "" if record.clip_coef is None else f" clip_coef {record.clip_coef:.4g}"
        nonfinite = sum(record.nonfinite.values())
        message = (f"step {record.step}: total_norm {record.total_norm:.4g}{clip} "
                   f"nonfinite {nonfinite}; largest: {shown}")
        if record.nonfinite:
            message += "; NaN/Inf in " + ", ".join(map(_printable, record.nonfinite))
        self.logger.info(message)


def _module_label(module: str) -> str:
    if module == ROOT_MODULE:
        return ROOT_LABEL
    return repr(module) if module == ROOT_LABEL else _printable(module)  # a child "<root>"


def _printable(name: str) -> str:
    """``name`` as is, or escaped like a Python literal when it holds a newline or other
    non-printable characters (so a log line cannot be split or forged)."""
    return name if name.isprintable() else repr(name)[1:-1]


def _sortable(norm: float) -> float:
    return float("inf") if norm != norm else norm  # NaN first: it is the news
