"""Where ``GradMonitor`` writes its records.

A sink is any object with ``write(record)`` (a :class:`gradstats.StepRecord`) and,
optionally, ``close()``; subclass :class:`Sink` for a no-op ``close``. Built-in sinks are
named by strings:

==========================  ===========================================================
``"jsonl:PATH"``            one JSON object per logged step, one whole line each
``"csv:PATH"``              one row per (step, total/module/parameter)
``"jsonl"``, ``"csv"``      the same into a new ``runs/gradstats-<UTC>-<pid>-<n>.jsonl``
``"tensorboard:DIR"``       scalars and log2-magnitude histograms (needs ``tensorboard``)
``"wandb"``                 ``wandb.log`` into the active run (needs ``wandb``)
``"logging"``               one INFO line per logged step on the ``gradstats`` logger
==========================  ===========================================================

A file sink never empties a file it did not create: an existing non-empty ``PATH`` is a
``FileExistsError`` unless the spec says what to do with it, ``"jsonl+append:PATH"`` (continue
it) or ``"jsonl+overwrite:PATH"`` (replace it); likewise ``csv+append``/``csv+overwrite``, and
``JsonlSink(path, append=True)`` / ``overwrite=True``. :func:`open_sinks` checks every spec and
path before it opens anything, so a monitor that fails to start has touched no file.

The classes are importable from here (``from gradstats.sinks import JsonlSink``);
TensorBoard and W&B load only when their sink is used.

Sinks run on the host after the statistics have been copied there, never on the
training step's critical path; the monitor guards them (:mod:`gradstats.sinks.fanout`), so
a sink that fails is reported and retried and never stops training.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
from pathlib import Path

__all__ = ["Sink", "SINK_KINDS", "SinkSpec", "make_sink", "open_sinks", "parse_sink_spec",
           "JsonlSink", "CsvSink", "TensorBoardSink", "WandbSink", "LoggingSink"]


class Sink(abc.ABC):
    """Base class for sinks: implement ``write``; ``close`` flushes and releases files."""

    @abc.abstractmethod
    def write(self, record) -> None:  # record: gradstats.StepRecord
        """Write one step's record."""

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class _Kind:
    module: str
    class_name: str
    argument: str  # "path" (optional: a default file), "folder" (required) or "" (none)


SINK_KINDS = {
    "jsonl": _Kind("jsonl", "JsonlSink", "path"),
    "csv": _Kind("csv_rows", "CsvSink", "path"),
    "tensorboard": _Kind("tensorboard", "TensorBoardSink", "folder"),
    "wandb": _Kind("wandb_run", "WandbSink", ""),
    "logging": _Kind("log", "LoggingSink", ""),
}
_CLASSES = {kind.class_name: kind.module for kind in SINK_KINDS.values()}


@dataclasses.dataclass(frozen=True)
class SinkSpec:
    """A parsed ``"kind[+mode][:argument]"`` string."""

    kind: str
    argument: str
    mode: str  # for file sinks: "new", "append" or "overwrite"

    @property
    def path(self) -> Path | None:
        """The file this spec names (None: not a file sink, or the default file)."""
        is_file = SINK_KINDS[self.kind].argument == "path"
        return Path(self.argument) if is_file and self.argument else None

    def open(self) -> Sink:
        kind = SINK_KINDS[self.kind]
        sink_class = getattr(importlib.import_module(f"{__name__}.{kind.module}"),
                             kind.class_name)
        if kind.argument == "path":
            return sink_class(self.argument or None, append=self.mode == "append",
                              overwrite=self.mode == "overwrite")
        return sink_class(self.argument) if kind.argument else sink_class()


def parse_sink_spec(spec: str) -> SinkSpec:
    """Check a sink string; raises ``ValueError`` naming what is wrong with it."""
    head, _, argument = spec.partition(":")
    kind, _, mode = head.partition("+")
    if kind not in SINK_KINDS:
        raise ValueError(f"unknown sink {spec!r}; known kinds: {', '.join(SINK_KINDS)}")
    takes = SINK_KINDS[kind].argument
    if mode and (takes != "path" or mode not in ("append", "overwrite")):
        raise ValueError(f"sink {spec!r}: '+{mode}' is not a mode of {kind!r} "
                         f"(file sinks take '+append' or '+overwrite')")
    if takes == "folder" and not argument:
        raise ValueError(f"sink {spec!r} needs a folder: '{kind}:DIR'")
    if not takes and argument:
        raise ValueError(f"sink {kind!r} takes no argument, got {spec!r}")
    return SinkSpec(kind, argument, mode or "new")


def make_sink(spec) -> Sink:
    """A sink from ``"kind[+mode]:ARG"``, ``"kind"`` or an object that already has
    ``write``."""
    [sink] = open_sinks([spec])
    return sink


def open_sinks(specs) -> list:
    """The sinks for ``specs`` (one spec or a list; ``None`` or ``[]``: none). Every spec
    and every file target is checked before the first sink opens anything, and the sinks
    already opened are closed again when a later one fails to open.

    Raises:
        TypeError: ``specs`` is not a spec, a sink object or a list of them.
        ValueError: a bad spec string, or two sinks naming one file.
        FileExistsError: a file sink would empty a file it did not create.
    """
    from .files import check_target  # here: this package's __init__ stays import-light

    checked = [_check_spec(spec) for spec in sink_specs(specs)]
    paths = [spec.path.resolve() for spec in checked
             if isinstance(spec, SinkSpec) and spec.path is not None]
    for path in paths:
        if paths.count(path) > 1:
            raise ValueError(f"two sinks write the same file {str(path)!r}")
    for spec in checked:
        if isinstance(spec, SinkSpec) and spec.path is not None:
            check_target(spec.path, spec.mode)
    sinks: list = []
    try:
        for spec in checked:
            sinks.append(spec.open() if isinstance(spec, SinkSpec) else spec)
    except BaseException:
        for sink in sinks:
            getattr(sink, "close", lambda: None)()
        raise
    return sinks


def sink_specs(specs) -> list:
    """One sink spec or a list of them, as a new list (``None``: empty)."""
    if specs is None:
        return []
    if isinstance(specs, str) or callable(getattr(specs, "write", None)):
        return [specs]
    if isinstance(specs, (list, tuple)):
        return list(specs)
    raise TypeError(f"sinks must be a sink spec such as 'jsonl:PATH', an object with a "
                    f"write(record) method, a list of them, or None, got "
                    f"{type(specs).__name__}")


def _check_spec(spec):
    if isinstance(spec, str):
        return parse_sink_spec(spec)
    if callable(getattr(spec, "write", None)):
        return spec
    raise TypeError(f"a sink is a string such as 'jsonl:PATH' or an object with a "
                    f"write(record) method, got {type(spec).__name__}")


def __getattr__(name: str):
    # The sink classes load on first use: importing gradstats must not import tensorboard.
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def require(module: str, package: str, extra: str, sink: str):
    """Import an optional dependency, or fail with a message that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"the {sink!r} sink needs the '{package}' package, which is not installed: "
            f"pip install {package}  (or: pip install 'gradstats[{extra}]')"
        ) from error
