"""``"jsonl:PATH"``: one JSON object per logged step, written as one whole line."""
from __future__ import annotations

import json
from pathlib import Path

from . import Sink
from .files import LineFile, check_mode


class JsonlSink(Sink):
    """Writes ``record.to_json()`` to ``path``, one line per record, each line in one write
    (so a crash or Ctrl-C leaves complete lines, and a failed write is cut back off).
    :func:`gradstats.read_jsonl` reads the file back.

    Args:
        path (str or Path, optional): the file; its folders are created. Default: a new
            ``runs/gradstats-<UTC time>-<pid>-<n>.jsonl`` (see ``.path``).
        append (bool): continue an existing file. Default: False
        overwrite (bool): empty an existing file first. Default: False. Without either, an
            existing non-empty file is a ``FileExistsError``: gradstats never empties a
            file it did not create unless told to.
    """

    def __init__(self, path: str | Path | None = None, *, append: bool = False,
                 overwrite: bool = False):
        self._file = LineFile(path, check_mode(append, overwrite), suffix=".jsonl")
        self.path = self._file.path

    def write(self, record) -> None:
        # allow_nan=False: to_json() already spells non-finite floats as strings, and a
        # bare NaN would make the line unreadable to strict JSON parsers.
        self._file.write(json.dumps(record.to_json(), allow_nan=False) + "\n")

    def close(self) -> None:
        self._file.close()
