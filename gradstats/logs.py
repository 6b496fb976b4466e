"""Reading the monitor's logs back: ``read_jsonl`` and a flat table of the records."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .record import StepRecord

__all__ = ["read_jsonl", "records_to_rows"]

SCOPES = ("total", "module", "parameter")


def read_jsonl(path: str | Path) -> list[StepRecord]:
    """The records a ``"jsonl:PATH"`` sink wrote, in file order.

    Non-finite values (``"nan"``, ``"inf"``) come back as floats, histograms with their
    edges. A line that does not parse (a line torn by a crash or a full disk, another
    program's output) is skipped, with one warning saying how many were.

    Example::

        >>> records = gradstats.read_jsonl("runs/grads.jsonl")
        >>> [(r.step, r.total_norm) for r in records]
    """
    records, bad_lines = [], []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(StepRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError):
                bad_lines.append(number)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (", ..." if len(bad_lines) > 5 else "")
        warnings.warn(f"gradstats.read_jsonl: skipped {len(bad_lines)} unreadable line(s) of "
                      f"{str(path)!r} (line {shown})", RuntimeWarning, stacklevel=2)
    return records


def records_to_rows(records: list[StepRecord], scope: str | None = None) -> list[dict]:
    """One dict per (step, scope, name), the rows of the ``"csv"`` sink:
    ``{"step", "scope", "name", "norm", "nonfinite", "clip_coef"}`` with ``scope`` one of
    ``"total"``, ``"module"``, ``"parameter"`` (only that one when ``scope`` is given).
    ``clip_coef`` is None where there is none (rows other than ``total``, steps that did
    not clip). Ready for ``pandas.DataFrame(rows)``.
    """
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} or None, got {scope!r}")
    rows = []
    for record in records:
        if scope in (None, "total"):
            rows.append({"step": record.step, "scope": "total", "name": "",
                         "norm": record.total_norm,
                         "nonfinite": sum(record.nonfinite.values()),
                         "clip_coef": record.clip_coef})
        if scope in (None, "module"):
            rows += [{"step": record.step, "scope": "module", "name": name, "norm": norm,
                      "nonfinite": record.module_nonfinite.get(name, 0), "clip_coef": None}
                     for name, norm in record.module_norms.items()]
        if scope in (None, "parameter"):
            rows += [{"step": record.step, "scope": "parameter", "name": name, "norm": norm,
                      "nonfinite": record.nonfinite.get(name, 0), "clip_coef": None}
                     for name, norm in record.norms.items()]
    return rows
