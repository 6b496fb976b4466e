"""``"csv:PATH"``: one row per (step, scope, name), easy to load into a dataframe."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from . import Sink
from .files import LineFile, check_mode

COLUMNS = ["step", "scope", "name", "norm", "nonfinite", "clip_coef"]


class CsvSink(Sink):
    """Writes rows ``step, scope, name, norm, nonfinite, clip_coef`` to ``path``: one
    ``total`` row (with the clip coefficient), then one row per ``module`` (the model's own
    parameters: name ``""``) and per ``parameter``. The header is written when the file is
    empty; each step's rows go out in one write, so a crash or a failed write leaves whole
    rows. Histograms are not written here (use JSONL or TensorBoard).

    Args:
        path, append, overwrite: as for :class:`~gradstats.sinks.JsonlSink` (default path
            ``runs/gradstats-<UTC time>-<pid>-<n>.csv``).
    """

    def __init__(self, path: str | Path | None = None, *, append: bool = False,
                 overwrite: bool = False):
        self._file = LineFile(path, check_mode(append, overwrite), suffix=".csv")
        self.path = self._file.path
        self._header_due = self._file.empty

    def write(self, record) -> None:
        clip_coef = "" if record.clip_coef is None else repr(record.clip_coef)
        total_nonfinite = sum(record.nonfinite.values())
        rows = [COLUMNS] if self._header_due else []
        rows.append([record.step, "total", "", repr(record.total_norm), total_nonfinite,
                     clip_coef])
        rows += [[record.step, "module", name, repr(norm), record.module_nonfinite.get(name, 0),
                  ""] for name, norm in record.module_norms.items()]
        rows += [[record.step, "parameter", name, repr(norm), record.nonfinite.get(name, 0), ""]
                 for name, norm in record.norms.items()]
        text = io.StringIO(newline="")
        csv.writer(text).writerows(rows)
        self._file.write(text.getvalue())
        self._header_due = False

    def close(self) -> None:
        self._file.close()

