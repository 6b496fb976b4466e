"""``"jsonl:PATH"``: one JSON object per logged step, written as one flushed line."""
from __future__ import annotations

import json
from pathlib import Path

from . import Sink


class JsonlSink(Sink):
    """Writes ``record.to_json()`` to ``path`` (created with its folders; emptied first
    unless ``append=True``), one line per record. Each line is written whole and flushed,
    so a crash leaves complete lines."""

    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:  # a new run starts a new file: steps from 0 again would mix
            self.path.write_text("")
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record) -> None:
        # allow_nan=False: to_json() already spells non-finite floats as strings, and a
        # bare NaN would make the line unreadable to strict JSON parsers.
        self._file.write(json.dumps(record.to_json(), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
