"""Where ``GradMonitor`` writes its records.

A sink is any object with ``write(record)`` (a :class:`gradstats.StepRecord`) and,
optionally, ``close()``; subclass :class:`Sink` for a no-op ``close``. Built-in sinks are
named by strings:

====================  =================================================================
``"jsonl:PATH"``      one JSON object per logged step, one line each, flushed
``"csv:PATH"``        one row per (step, total/module/parameter), flushed
``"tensorboard:DIR"`` scalars and log2-magnitude histograms (needs ``tensorboard``)
``"wandb"``           ``wandb.log`` into the active run (needs ``wandb``)
``"logging"``         one INFO line per logged step on the ``gradstats`` logger
====================  =================================================================

Sinks run on the host after the statistics have been copied there, never on the
training step's critical path.
"""
from __future__ import annotations

import abc
import importlib

__all__ = ["Sink", "make_sink", "SINK_KINDS"]


class Sink(abc.ABC):
    """Base class for sinks: implement ``write``; ``close`` flushes and releases files."""

    @abc.abstractmethod
    def write(self, record) -> None:  # record: gradstats.StepRecord
        """Write one step's record."""

    def close(self) -> None:
        pass


# kind -> (module, class, whether it takes a ":ARG")
SINK_KINDS = {
    "jsonl": ("jsonl", "JsonlSink", True),
    "csv": ("csv_rows", "CsvSink", True),
    "tensorboard": ("tensorboard", "TensorBoardSink", True),
    "wandb": ("wandb_run", "WandbSink", False),
    "logging": ("log", "LoggingSink", False),
}


def make_sink(spec) -> Sink:
    """A sink from ``"kind:ARG"``, ``"kind"`` or an object that already has ``write``."""
    if not isinstance(spec, str):
        if callable(getattr(spec, "write", None)):
            return spec
        raise TypeError(f"a sink is a string such as 'jsonl:PATH' or an object with a "
                        f"write(record) method, got {type(spec).__name__}")
    kind, _, argument = spec.partition(":")
    if kind not in SINK_KINDS:
        raise ValueError(f"unknown sink {spec!r}; known kinds: {', '.join(SINK_KINDS)}")
    module_name, class_name, takes_argument = SINK_KINDS[kind]
    if takes_argument and not argument:
        raise ValueError(f"sink {spec!r} needs a path: '{kind}:PATH'")
    if not takes_argument and argument:
        raise ValueError(f"sink {kind!r} takes no argument, got {spec!r}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    sink_class = getattr(module, class_name)
    return sink_class(argument) if takes_argument else sink_class()


def require(module: str, package: str, extra: str, sink: str):
    """Import an optional dependency, or fail with a message that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"the {sink!r} sink needs the '{package}' package, which is not installed: "
            f"pip install {package}  (or: pip install 'gradstats[{extra}]')"
        ) from error
