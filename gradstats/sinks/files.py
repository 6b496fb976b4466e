"""The log files of the file sinks: where they go, what may be opened, and whole-line writes.

Two rules keep a log from harming anything:

- a file this run did not create is never emptied unless the user said so
  (``overwrite=True``), and is continued only when asked (``append=True``);
- a write lands whole or not at all: a failed write (a full disk) is cut back to the last
  complete line, so readers never meet a torn line in the middle of the file.
"""
from __future__ import annotations

import datetime
import errno
import itertools
import os
import weakref
from pathlib import Path

# Where the default sink writes: a new file per monitor, named so that two monitors (in one
# process, or two processes started in the same second) never share one.
DEFAULT_FOLDER = "runs"
_default_counter = itertools.count()  # numbers the default files of this process

MODES = ("new", "append", "overwrite")

# The files this process's sinks hold open: a second sink on one of them would interleave
# its lines with the first's (two monitors given one path), whatever its mode. Weak: a sink
# dropped without close() lets its path go.
_open_files: weakref.WeakValueDictionary[Path, LineFile] = weakref.WeakValueDictionary()


def check_mode(append: bool, overwrite: bool) -> str:
    """``"new"``, ``"append"`` or ``"overwrite"`` from a file sink's two flags."""
    if append and overwrite:
        raise ValueError("a file sink takes append=True or overwrite=True, not both")
    return "append" if append else ("overwrite" if overwrite else "new")


def check_target(path: Path, mode: str) -> None:
    """Raise before anything is opened if ``path`` cannot be used as a ``mode`` log file:
    an existing non-empty file without ``append``/``overwrite``, a folder, or a place that
    cannot be written. Run for every sink of a monitor before any of them opens a file."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a log file path names a folder", str(path))
    if path.resolve() in _open_files:
        raise FileExistsError(errno.EEXIST, "another gradstats sink of this process is writing "
                              "this file: close() the monitor that writes it (a monitor attached "
                              "to an optimizer lives until then), or give each its own path",
                              str(path))
    if path.exists():
        if mode == "new" and path.is_file() and path.stat().st_size > 0:
            raise FileExistsError(
                errno.EEXIST,
                "gradstats will not empty a file it did not create: pass append=True to "
                "continue it or overwrite=True to replace it (in a spec string: "
                "'KIND+append:PATH' or 'KIND+overwrite:PATH'), or choose another path",
                str(path))
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "cannot write the log file", str(path))
        return
    # Making the folders is the one test that also holds for root (who passes os.access
    # everywhere, /proc included); an empty folder left behind harms nothing.
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "cannot create the log file in", str(path.parent))


def default_path(suffix: str) -> Path:
    """``runs/gradstats-<UTC time>-<pid>-<n><suffix>``: unique within the process by the
    counter, across processes by the pid (and by :func:`create_new` if even that repeats,
    as with pid 1 in containers)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    number = next(_default_counter)
    return Path(DEFAULT_FOLDER) / f"gradstats-{stamp}-{os.getpid()}-{number}{suffix}"


def create_new(suffix: str) -> tuple[Path, int]:
    """A default path created here and now (``O_EXCL``: never one another run holds), and
    its descriptor."""
    while True:
        path = default_path(suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return path, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # the same name from another process: take the next number


class LineFile:
    """An append-only log file that takes whole chunks of lines.

    Each chunk goes out in one unbuffered ``write`` (so a SIGKILL after it returns leaves it
    complete), and a chunk that fails part-way (ENOSPC) is cut off again with ``ftruncate``.
    If even that fails, the next chunk starts with a newline, so the torn bit stays a line
    of its own that a reader skips (:func:`gradstats.read_jsonl` does).

    Args:
        path: the file, or ``None`` for a new default file with ``suffix``.
        mode: ``"new"`` (refuse a non-empty file: checked by :func:`check_target` first),
            ``"append"`` or ``"overwrite"``.
    """

    def __init__(self, path: str | Path | None, mode: str, suffix: str = ""):
        if path is None:
            self.path, fd = create_new(suffix)
        else:
            self.path = Path(path)
            check_target(self.path, mode)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            fd = os.open(self.path, flags | (os.O_TRUNC if mode == "overwrite" else 0), 0o644)
        self._file = os.fdopen(fd, "ab", buffering=0)
        self._held = self.path.resolve()
        _open_files[self._held] = self
        self._end = os.fstat(fd).st_size  # where the last complete chunk ends
        self._torn = False  # a failed chunk is still in the file: start the next on a new line

    @property
    def empty(self) -> bool:
        return self._end == 0

    def write(self, text: str) -> None:
        """Append ``text`` (whole lines) or raise ``OSError`` with the file as it was."""
        data = text.encode("utf-8")
        after_torn = self._torn
        if after_torn:
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:  # a raw write may take only part (a signal, a pipe)
                view = view[self._file.write(view):]
        except BaseException:
            self._cut_back()
            raise
        # After a torn chunk that could not be cut off, the file is longer than we know.
        self._end = os.fstat(self._file.fileno()).st_size if after_torn else self._end + len(data)
        self._torn = False

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._file.fileno(), self._end)
        except OSError:
            self._torn = True  # not a regular file, or truncation refused: keep lines apart
        else:
            self._torn = False

    def close(self) -> None:
        if _open_files.get(self._held) is self:  # not a later sink's hold on the same path
            del _open_files[self._held]
        self._file.close()
