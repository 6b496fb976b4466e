"""``"csv:PATH"``: one row per (step, scope, name), easy to load into a dataframe."""
from __future__ import annotations

import csv
from pathlib import Path

from . import Sink

COLUMNS = ["step", "scope", "name", "norm", "nonfinite", "clip_coef"]


class CsvSink(Sink):
    """Writes rows ``step, scope, name, norm, nonfinite, clip_coef`` to ``path`` (emptied
    first unless ``append=True``): one ``total`` row (with the clip coefficient), then one
    row per ``module`` and per ``parameter``. The header is written when the file is
    empty; rows are flushed per step.
    Histograms are not written here (use JSONL or TensorBoard)."""

    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:  # a new run starts a new file: steps from 0 again would mix
            self.path.write_text("")
        is_new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if is_new:
            self._writer.writerow(COLUMNS)

    def write(self, record) -> None:
        clip_coef = "" if record.clip_coef is None else repr(record.clip_coef)
        total_nonfinite = sum(record.nonfinite.values())
        rows = [[record.step, "total", "", repr(record.total_norm), total_nonfinite, clip_coef]]
        rows += [[record.step, "module", name, repr(norm), record.module_nonfinite.get(name, 0),
                  ""] for name, norm in record.module_norms.items()]
        rows += [[record.step, "parameter", name, repr(norm), record.nonfinite.get(name, 0), ""]
                 for name, norm in record.norms.items()]
        self._writer.writerows(rows)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
