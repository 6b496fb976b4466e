"""What NaN/Inf gradients make the monitor do: ``on_nonfinite`` and its bookkeeping.

The counts reach the host a step or so after the step itself (``RecordQueue``); this module
decides what to say then. ``"raise"`` is decided at the step itself, by the monitor, with
the one sync the user asked for; ``"skip"`` is carried out by ``OptimizerHooks``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from .user_warnings import warn

__all__ = ["NonFiniteGradientWarning", "ON_NONFINITE"]

ON_NONFINITE = ("warn", "raise", "skip", "ignore")
# Alarms raised as warnings per monitor; later ones go to the "gradstats" logger. Each
# warning text names its step, and Python's warning registry keeps every distinct text
# for good: NaN that comes and goes every other step would grow it without bound.
MAX_WARNINGS = 5

logger = logging.getLogger("gradstats")


class NonFiniteGradientWarning(RuntimeWarning):
    """NaN/Inf gradients appeared. ``step`` is the monitor's step, ``found`` maps each
    parameter with non-finite values to their count, ``origin`` is where the tracked
    activations say the NaN/Inf was born (``{"module", "phase", "step"}``) or None."""

    def __init__(self, message: str, step: int, found: dict[str, int],
                 origin: dict | None = None):
        super().__init__(message)
        self.step, self.found, self.origin = step, found, origin


class NonFinitePolicy:
    """``on_nonfinite`` for steps whose counts have landed: a warning once per run of
    non-finite steps (``"warn"``, ``"skip"``), a call per step (a callable), nothing
    (``"ignore"``; ``"raise"`` acted at the step). ``announce=False``: no warning (another
    rank of a distributed run says it; the callable is still called), except that where
    this rank's tracked activations name the NaN/Inf's origin, it goes to the logger."""

    def __init__(self, action: str | Callable[[int, dict[str, int]], None],
                 announce: bool = True):
        if not (callable(action) or action in ON_NONFINITE):
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE} or a callable, "
                             f"got {action!r}")
        self.action = action
        self.announce = announce
        self.in_nonfinite_run = False
        self.alarms = 0

    def on_landed(self, step: int, found: dict[str, int], origin: dict | None = None) -> None:
        """Called in step order with each step's non-zero counts (empty for a clean step,
        and for one GradScaler skipped for overflow), and the activations' NaN/Inf origin
        when they are tracked."""
        if self.action == "raise":
            return  # checked at the step itself
        first_of_run = bool(found) and not self.in_nonfinite_run
        self.in_nonfinite_run = bool(found)
        if not found:
            return
        if callable(self.action):
            self.action(step, found)
        elif first_of_run and self.action in ("warn", "skip"):
            if self.announce:
                self._alarm(step, found, origin)
            elif origin:
                # Activations are each rank's own (its batch): the announcing rank may not
                # have seen where this NaN/Inf was born, and would warn without it.
                logger.warning(self._message(step, found, origin))

    def _message(self, step: int, found: dict[str, int], origin: dict | None) -> str:
        what = "its optimizer update was skipped" if self.action == "skip" else (
            "later steps are not reported until the gradients are finite again")
        return (f"gradstats: NaN/Inf gradients first appeared at step {step} in "
                f"{describe(found)}{describe_origin(origin)}; {what}")

    def _alarm(self, step: int, found: dict[str, int], origin: dict | None) -> None:
        message = self._message(step, found, origin)
        self.alarms += 1
        if self.alarms <= MAX_WARNINGS:
            if self.alarms == MAX_WARNINGS:
                message += ("; further NaN/Inf alarms of this monitor go to the 'gradstats' "
                            "logger only")
            warn(NonFiniteGradientWarning(message, step, found, origin))
        else:
            logger.warning(message)


def describe(found: dict[str, int]) -> str:
    return ", ".join(f"{name!r} ({count} NaN/Inf)" for name, count in found.items())


def describe_origin(origin: dict | None) -> str:
    """``"; born in module 'X' (forward)"`` for a tracked-activation origin, else ``""``."""
    if not origin:
        return ""
    where = "the loss, at the model's output" if origin.get("from_loss") else origin["phase"]
    return f"; born in module {origin['module'] or '<root>'!r} ({where})"
