"""``gradstats.diagnose``: what is wrong with a run's gradients, in words, from its records.

Backprop multiplies one Jacobian per layer, so ``||dL/dh_l||`` behaves like
``gamma^(L-l) ||dL/dh_L||``: on a log axis against depth a straight line of slope
``-log gamma`` (input side first). Flat (``gamma ~ 1``) is healthy, falling towards the input
(``gamma < 1``) is vanishing, rising towards the input (``gamma > 1``) is exploding. The fit
uses, best first:

1. ``dL/dh`` at each layer's output, when the monitor tracked activations;
2. bias gradients (a bias gradient is ``dL/dh_l`` summed over the batch, so it follows the
   same ``gamma^(L-l)``);
3. weight gradients, with a caveat: ``||dL/dW_l|| = ||dL/dh_l|| * ||h_(l-1)||``, and in a
   deep linear net with orthogonal layers scaled by gamma the forward growth ``gamma^(l-1)``
   cancels the backward decay exactly, so weight-gradient norms are flat for every gamma.

Layers are the members of a *role*: modules (or parameters) whose names differ only in
numeric path parts (``blocks.3.mlp.fc1`` and ``blocks.4.mlp.fc1``; ``0`` and ``2`` in an
``nn.Sequential``), and with tracked activations also of the same class. Roles with at
least ``MIN_LAYERS`` members are fitted together: the slope is the median of every pairwise
slope within a role (Theil-Sen), which a single odd layer (an output head) cannot drag.

Thresholds, and why (those of the findings are in :mod:`gradstats.findings`):

- ``STACK_FACTOR = 10``: vanishing/exploding when ``gamma^(depth-1)``, the ratio of the
  gradient at the input-side layer to the output-side one, is below 1/10 or above 10. One
  order of magnitude across the stack means the first layers train ten times slower (or
  faster) than the last under SGD; smaller drifts are within what per-layer noise and
  adaptive optimizers absorb.
- ``WINDOW = 10`` records per window: enough steps for the medians of the fit to shrug off
  one noisy batch, few enough that the verdict describes the run now and not its start.
- ``MIN_LAYERS = 3``: with two layers a slope is one ratio, which a single odd layer sets;
  three give three pairwise slopes whose median one outlier cannot move.

NaN/Inf: the finding names where it was first born (the earliest step in the records whose
tracked activations had an origin), and the latest too when that differs. A step with
NaN/Inf gradients or activations is written by the monitor even off its ``log_every``
grid. A NaN loss whose gradients are finite (``log`` of a negative model output:
``d log(y - c)/dy`` is finite) cannot be seen from gradients or the model's outputs and
goes unreported; a loss whose gradient is non-finite shows as a ``"from_loss"`` origin at
the model's last module.
"""
from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import findings as find
from .findings import has_nonfinite, median_finite
from .logs import read_jsonl
from .record import StepRecord, build_record
from .stats import GradStats
from .underflow import underflow_bounds, underflow_fractions

__all__ = ["Diagnosis", "GammaFit", "WindowDiagnosis", "diagnose", "fit_gamma", "load_records",
           "underflow_bounds", "underflow_fractions"]

VERDICTS = ("healthy", "vanishing", "exploding", "nonfinite")

WINDOW = 10  # records per window: the verdict is the most recent window's
MIN_LAYERS = 3  # members a role needs to take part in the fit
STACK_FACTOR = 10.0

CAVEATS = {
    "activation gradients": None,
    "bias gradients": ("fitted from bias gradients (each is dL/dh summed over the batch); "
                       "GradMonitor(track_activations=True) measures dL/dh directly"),
    "weight gradients": ("fitted from weight gradients alone, which can hide gamma: "
                         "||dL/dW_l|| = ||dL/dh_l|| * ||h_(l-1)||, and forward growth cancels "
                         "backward decay (in a deep linear net the weight-gradient profile is "
                         "flat for every gamma); track activations for a reliable gamma"),
}


@dataclass
class GammaFit:
    """The per-layer backward factor fitted from a window's profile.

    Attributes:
        gamma: ``||dL/dh_(l-1)|| / ||dL/dh_l||``, per layer (below 1: shrinking towards the
            input).
        source: ``"activation gradients"``, ``"bias gradients"`` or ``"weight gradients"``.
        depth: layers in the largest role fitted.
        layers: the fitted layers' names, input side first, role by role.
        norms: their norms (window medians), in the same order.
        roles: the fitted layers grouped by role, each input side first.
    """

    gamma: float
    source: str
    depth: int
    layers: list[str]
    norms: list[float]
    roles: list[list[str]] = field(default_factory=list)

    @property
    def stack_factor(self) -> float:
        """``gamma^(depth-1)``: the input-side layer's gradient over the output-side one's."""
        try:
            return self.gamma ** (self.depth - 1)
        except OverflowError:
            return math.inf


@dataclass
class WindowDiagnosis:
    """One window of consecutive records."""

    first_step: int
    last_step: int
    verdict: str
    gamma: float | None
    median_total_norm: float
    nonfinite_steps: list[int]


@dataclass
class Diagnosis:
    """What :func:`diagnose` found.

    Attributes:
        verdict: ``"healthy"``, ``"vanishing"``, ``"exploding"`` or ``"nonfinite"``, for the
            most recent window of steps.
        gamma: the fitted per-layer backward factor (None when no role had ``MIN_LAYERS``
            layers).
        gamma_source: what it was fitted from (see :data:`CAVEATS`).
        caveat: what that source can hide, or None.
        findings: readable strings naming the parameters/layers concerned and the fixes.
        history: one :class:`WindowDiagnosis` per window, oldest first.
        fit: the most recent window's :class:`GammaFit` (the per-layer profile, for plots).
        underflow: the latest histogram's shares of non-zero values past fp16/bf16 limits
            (``{"fp16_zero", "fp16_subnormal", "bf16_zero", "bf16_subnormal",
            "fp16_overflow"}``) as ``(low, high)`` bounds (equal where the histogram tells;
            see :func:`gradstats.underflow.underflow_bounds`), or None without histograms.
        nonfinite_origin: ``{"module", "phase", "step"}`` (and ``"from_loss": True`` for a
            gradient the loss made non-finite): where the first NaN/Inf in the records was
            born (tracked activations only).
        latest_nonfinite_origin: the same for the latest.
        steps: the steps the records cover.
    """

    verdict: str
    gamma: float | None
    gamma_source: str | None
    caveat: str | None
    findings: list[str]
    history: list[WindowDiagnosis]
    fit: GammaFit | None = None
    underflow: dict[str, float] | None = None
    nonfinite_origin: dict | None = None
    latest_nonfinite_origin: dict | None = None
    steps: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict}"]
        if self.gamma is not None:
            lines.append(f"gamma: {self.gamma:.4g} per layer over {self.fit.depth} layers "
                         f"(from {self.gamma_source})")
        if self.caveat:
            lines.append(f"caveat: {self.caveat}")
        lines += [f"- {finding}" for finding in self.findings]
        return "\n".join(lines)


def diagnose(source, *, window: int = WINDOW) -> Diagnosis:
    r"""Diagnose a run's gradients: vanishing, exploding, non-finite or healthy, and why.

    Args:
        source: a :class:`GradMonitor` (its recent records, after a :meth:`flush`, which
            waits for the device), a :class:`GradStats` (one step; copied to the host), a
            path to a JSONL log the monitor wrote, or a list of :class:`StepRecord`.
        window (int): records per window; the verdict is the last window's. Default: 10

    Returns:
        a :class:`Diagnosis`.

    Example::

        >>> with gradstats.GradMonitor(model, track_activations=True, hist_every=50) as m:
        ...     train(model, m)
        ...     print(gradstats.diagnose(m))
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    records, watched, sparse_modules = _records(source)
    if not records:
        raise ValueError("gradstats.diagnose: no records to diagnose (no step was logged)")
    windows = [records[max(0, end - window):end]
               for end in range(len(records), 0, -window)][::-1]
    history, fits = [], []
    for part in windows:
        fit = fit_gamma(part)
        fits.append(fit)
        nonfinite_steps = _nonfinite_steps(part)
        history.append(WindowDiagnosis(
            first_step=part[0].step, last_step=part[-1].step,
            verdict=_verdict(fit, nonfinite_steps), gamma=fit and fit.gamma,
            median_total_norm=median_finite([r.total_norm for r in part]),
            nonfinite_steps=nonfinite_steps))
    last, fit = history[-1], fits[-1]
    source_name = fit.source if fit else None
    origins = [r.activations.nonfinite_origin for r in records
               if r.activations is not None and r.activations.nonfinite_origin]
    first_origin, latest_origin = (origins[0], origins[-1]) if origins else (None, None)
    latest_hist = next((r for r in reversed(records) if r.hist is not None), None)
    underflow = underflow_bounds(latest_hist) if latest_hist is not None else None
    sparse_modules |= find.sparse_row_modules(records)
    findings = _findings(records, windows[-1], fit, first_origin, latest_origin, underflow,
                         latest_hist, watched, sparse_modules)
    return Diagnosis(verdict=last.verdict, gamma=fit and fit.gamma, gamma_source=source_name,
                     caveat=CAVEATS.get(source_name) if fit else None, findings=findings,
                     history=history, fit=fit, underflow=underflow,
                     nonfinite_origin=first_origin, latest_nonfinite_origin=latest_origin,
                     steps=[r.step for r in records])


# -- sources ------------------------------------------------------------------------------
def load_records(source) -> list[StepRecord]:
    """The records of ``source`` (anything :func:`diagnose` takes), in step order."""
    return _records(source)[0]


def _records(source) -> tuple[list[StepRecord], list[str] | None, set[str]]:
    """The records in step order, the names of every watched parameter when the source
    knows them, and the model's embedding modules when it knows the model."""
    records, watched = _unsorted_records(source)
    return sorted(records, key=lambda r: r.step), watched, _embedding_modules(source)


def _embedding_modules(source) -> set[str]:
    from .monitor import GradMonitor

    module = source._watched.module if isinstance(source, GradMonitor) else None
    if module is None:
        return set()
    return {name for name, m in module.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def _unsorted_records(source) -> tuple[list[StepRecord], list[str] | None]:
    from .monitor import GradMonitor  # here: the monitor imports much of the package

    if isinstance(source, GradMonitor):
        if not source.sinks:
            raise ValueError("gradstats.diagnose: this monitor keeps no records (sinks=None); "
                             "give it a sink, e.g. sinks=['jsonl'] or an object with "
                             "write(record)")
        source.flush()  # the user asked: wait for the steps in flight
        return list(source.recent_records), source.parameter_names()
    if isinstance(source, GradStats):
        return [_record_of_stats(source)], None
    if isinstance(source, (str, Path)):
        return read_jsonl(source), None
    if isinstance(source, Iterable):
        records = list(source)
        if all(isinstance(r, StepRecord) for r in records):
            return records, None
    raise TypeError("gradstats.diagnose needs a GradMonitor, a GradStats, a path to a JSONL "
                    f"log or a list of StepRecord, got {type(source).__name__}")


def _record_of_stats(stats: GradStats) -> StepRecord:
    names = stats.names or [str(i) for i in range(len(stats))]

    def host(tensor):
        return None if tensor is None else tensor.detach().cpu()  # the user asked: a sync
    on_host = dataclasses.replace(
        stats, names=names, norms=host(stats.norms), total_norm=host(stats.total_norm),
        nonfinite=host(stats.nonfinite), hist=host(stats.hist), numel=host(stats.numel),
        clip_coef=host(stats.clip_coef))
    return build_record(0, on_host)


# -- the gamma fit ------------------------------------------------------------------------
_NUMERIC_PART = re.compile(r"(?<![^.])\d+(?![^.])")


def role_of(name: str) -> str:
    """``'blocks.3.mlp.fc1'`` -> ``'blocks.*.mlp.fc1'``: a name with its numeric path parts
    (the layer indices of ``ModuleList``/``Sequential``) replaced by ``*``."""
    return _NUMERIC_PART.sub("*", name)


def fit_gamma(records: Sequence[StepRecord]) -> GammaFit | None:
    """The window's gamma from the best source it holds (module docstring), or None."""
    finite = [r for r in records if not has_nonfinite(r)] or list(records)
    tracked = [r.activations for r in finite if r.activations is not None]
    if tracked:
        profile = _median_profile(
            {f"{m.kind}:{name}": m.grad_norm for name, m in a.modules.items()
             if m.grad_norm is not None} for a in tracked)
        fit = _fit(profile, lambda key: key, "activation gradients")
        if fit is not None:
            return fit
    for suffix, source in (("bias", "bias gradients"), ("weight", "weight gradients")):
        profile = _median_profile({name: norm for name, norm in r.norms.items()
                                   if name.rpartition(".")[2] == suffix} for r in finite)
        fit = _fit(profile, lambda key: key.rpartition(".")[0], source)
        if fit is not None:
            return fit
    return None


def _median_profile(per_record: Iterable[dict[str, float]]) -> dict[str, float]:
    """Per key, in first-seen order, the median of its positive finite values."""
    values: dict[str, list[float]] = {}
    for figures in per_record:
        for key, value in figures.items():
            bucket = values.setdefault(key, [])
            if value is not None and 0 < value < math.inf:
                bucket.append(value)
    return {key: statistics.median(v) for key, v in values.items() if v}


def _fit(profile: dict[str, float], module_of_key, source: str) -> GammaFit | None:
    roles: dict[str, list[str]] = {}
    for key in profile:
        kind, _, name = module_of_key(key).rpartition(":")
        roles.setdefault(f"{kind}:{role_of(name)}", []).append(key)
    fitted = [keys for keys in roles.values() if len(keys) >= MIN_LAYERS]
    if not fitted:
        return None
    slopes = []
    for keys in fitted:
        logs = [math.log(profile[key]) for key in keys]
        slopes += [(logs[j] - logs[i]) / (j - i)
                   for i in range(len(logs)) for j in range(i + 1, len(logs))]
    # Norms grow towards the output by 1/gamma per layer: slope = -log(gamma).
    gamma = math.exp(-statistics.median(slopes))
    def name(key: str) -> str:
        return module_of_key(key).rpartition(":")[2]
    keys = [key for role in fitted for key in role]
    return GammaFit(gamma=gamma, source=source, depth=max(map(len, fitted)),
                    layers=list(map(name, keys)), norms=[profile[key] for key in keys],
                    roles=[list(map(name, role)) for role in fitted])


def _verdict(fit: GammaFit | None, nonfinite_steps: list[int]) -> str:
    if nonfinite_steps:
        return "nonfinite"
    return _profile_verdict(fit)


def _profile_verdict(fit: GammaFit | None) -> str:
    """What the fitted profile alone says: vanishing, exploding or healthy."""
    if fit is None:
        return "healthy"
    factor = fit.stack_factor
    if factor < 1 / STACK_FACTOR:
        return "vanishing"
    if factor > STACK_FACTOR:
        return "exploding"
    return "healthy"


# -- non-finite values --------------------------------------------------------------------
def _nonfinite_steps(records: Sequence[StepRecord]) -> list[int]:
    return [r.step for r in records if has_nonfinite(r)]


# -- findings -----------------------------------------------------------------------------
def _findings(records, last_window, fit: GammaFit | None, first_origin, latest_origin,
              underflow, latest_hist, watched, sparse_modules: set[str]) -> list[str]:
    findings: list[str] = []
    findings += find.nonfinite_findings(records, last_window, first_origin, latest_origin)
    if fit is not None:
        findings += find.profile_findings(fit, _profile_verdict(fit))
    else:
        findings.append(f"gamma not fitted: no {MIN_LAYERS} or more layers whose names differ "
                        "only in their index (tracked modules of one class, or biases, or "
                        "weights), so the verdict reflects NaN/Inf only")
    findings += find.spike_findings(records)
    findings += find.saturation_findings(last_window)
    findings += find.dead_findings(records, latest_hist, watched, sparse_modules)
    if underflow is not None:
        findings += find.underflow_findings(underflow, latest_hist)
    return findings
