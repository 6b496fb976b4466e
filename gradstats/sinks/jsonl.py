"""``"jsonl:PATH"``: one JSON object per logged step, appended as one flushed line."""
from __future__ import annotations

import json
from pathlib import Path

from . import Sink


class JsonlSink(Sink):
    """Appends ``record.to_json()`` to ``path`` (created with its folders), one line per
    record. Each line is written whole and flushed, so a crash leaves complete lines."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record) -> None:
        # allow_nan=False: to_json() already spells non-finite floats as strings, and a
        # bare NaN would make the line unreadable to strict JSON parsers.
        self._file.write(json.dumps(record.to_json(), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
