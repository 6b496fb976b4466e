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

Thresholds, and why:

- ``STACK_FACTOR = 10``: vanishing/exploding when ``gamma^(depth-1)``, the ratio of the
  gradient at the input-side layer to the output-side one, is below 1/10 or above 10. One
  order of magnitude across the stack means the first layers train ten times slower (or
  faster) than the last under SGD; smaller drifts are within what per-layer noise and
  adaptive optimizers absorb.
- ``SPIKE_FACTOR = 5`` over the median of the ``SPIKE_LOOKBACK = 20`` steps before (at
  least ``MIN_SPIKE_HISTORY = 5``): a total norm five times its recent level is far outside
  the step-to-step noise of a stable run (usually well under 2x), and is how loss spikes
  announce themselves.
- ``SATURATED_FRACTION = 0.1``: more than a tenth of a sigmoid/tanh-like layer's outputs in
  the flat part of the curve (see :data:`gradstats.activations.SATURATION_MARGIN`).
- ``DEAD_ZERO_FRACTION = 0.5``: more than half of a gradient's entries exactly zero (from the
  histogram's zero column): with a batch, an entry is exactly zero only when the unit it
  feeds passed no gradient for any example (dead ReLU units, unused rows).
- ``UNDERFLOW_FRACTION = 0.01``: more than 1% of the non-zero gradient values below
  fp16's smallest subnormal (2^-24, they become 0) or normal (2^-14, precision lost) number;
  bf16 shares fp32's exponent range (normal down to 2^-126, subnormal to 2^-133).
"""
from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .logs import read_jsonl
from .record import ROOT_LABEL, StepRecord, build_record
from .stats import GradStats

__all__ = ["Diagnosis", "GammaFit", "WindowDiagnosis", "diagnose", "fit_gamma", "load_records",
           "underflow_fractions"]

VERDICTS = ("healthy", "vanishing", "exploding", "nonfinite")

WINDOW = 10  # records per window: the verdict is the most recent window's
MIN_LAYERS = 3  # members a role needs to take part in the fit
STACK_FACTOR = 10.0
SPIKE_FACTOR = 5.0
SPIKE_LOOKBACK = 20
MIN_SPIKE_HISTORY = 5
GROWTH_FACTOR = 10.0  # median total norm of the last window over the first's
SATURATED_FRACTION = 0.1
DEAD_ZERO_FRACTION = 0.5
UNDERFLOW_FRACTION = 0.01
SHOWN = 5  # names shown per finding

# (label, exponent t): the share of non-zero finite values with |x| < 2^t, and above.
FP16_SUBNORMAL_EXP = -24  # below the smallest fp16 subnormal: rounds to zero
FP16_NORMAL_EXP = -14  # below the smallest fp16 normal: subnormal, fewer mantissa bits
BF16_SUBNORMAL_EXP = -133
BF16_NORMAL_EXP = -126
FP16_OVERFLOW_EXP = 16  # |x| >= 2^16 = 65536 > 65504, fp16's largest finite value

FIXES_VANISHING = ("initialisation that preserves the signal (Glorot/Xavier for tanh and "
                   "sigmoid, He/Kaiming for ReLU, orthogonal), normalisation layers "
                   "(LayerNorm/BatchNorm), residual connections, non-saturating activations "
                   "(ReLU/GELU), and gating (LSTM/GRU) for recurrent nets")
FIXES_EXPLODING = ("gradient clipping (GradMonitor.step(max_norm=...) or "
                   "gradstats.clip_grad_norm_), a smaller initialisation gain, normalisation "
                   "layers, residual branches scaled down at init, a lower learning rate")
FIXES_NONFINITE = ("a lower learning rate or warm-up, gradient clipping, guarding log/sqrt/"
                   "division near 0 in the loss and the layer named, loss scaling "
                   "(torch.amp.GradScaler) under fp16; GradMonitor(on_nonfinite='skip') "
                   "skips such updates")
FIXES_SPIKES = ("a lower learning rate or a longer warm-up, gradient clipping at about the "
                "usual norm, and a look at the batches of those steps (bad or outlier data)")
FIXES_SATURATION = ("Glorot/Xavier initialisation or a smaller gain, normalisation before the "
                    "activation, or a non-saturating activation (ReLU/GELU)")
FIXES_DEAD = ("a lower learning rate, LeakyReLU/GELU instead of ReLU, He/Kaiming init; "
              "or check that the layer is used in forward at all")
FIXES_UNDERFLOW = ("loss scaling (torch.amp.GradScaler) under fp16, or bf16, which has "
                   "fp32's range")

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
        underflow: the latest histogram's fractions of non-zero values below fp16/bf16
            limits (``{"fp16_zero", "fp16_subnormal", "bf16_zero", "bf16_subnormal",
            "fp16_overflow"}``), or None without histograms.
        nonfinite_origin: ``{"module", "phase", "step"}``: where the latest NaN/Inf was born
            (tracked activations only).
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
    records, watched = _records(source)
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
            median_total_norm=_median_finite([r.total_norm for r in part]),
            nonfinite_steps=nonfinite_steps))
    last, fit = history[-1], fits[-1]
    source_name = fit.source if fit else None
    origin = _latest_origin(records)
    latest_hist = next((r for r in reversed(records) if r.hist is not None), None)
    underflow = underflow_fractions(latest_hist) if latest_hist is not None else None
    findings = _findings(records, windows[-1], last, fit, origin, underflow, latest_hist,
                         watched)
    return Diagnosis(verdict=last.verdict, gamma=fit and fit.gamma, gamma_source=source_name,
                     caveat=CAVEATS.get(source_name) if fit else None, findings=findings,
                     history=history, fit=fit, underflow=underflow, nonfinite_origin=origin,
                     steps=[r.step for r in records])


# -- sources ------------------------------------------------------------------------------
def load_records(source) -> list[StepRecord]:
    """The records of ``source`` (anything :func:`diagnose` takes), in step order."""
    return _records(source)[0]


def _records(source) -> tuple[list[StepRecord], list[str] | None]:
    """The records in step order, and the names of every watched parameter when the source
    knows them."""
    records, watched = _unsorted_records(source)
    return sorted(records, key=lambda r: r.step), watched


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
    finite = [r for r in records if not _has_nonfinite(r)] or list(records)
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
    if fit is None:
        return "healthy"
    factor = fit.stack_factor
    if factor < 1 / STACK_FACTOR:
        return "vanishing"
    if factor > STACK_FACTOR:
        return "exploding"
    return "healthy"


# -- non-finite values --------------------------------------------------------------------
def _has_nonfinite(record: StepRecord) -> bool:
    if record.nonfinite or not math.isfinite(record.total_norm):
        return True
    return record.activations is not None and record.activations.nonfinite_origin is not None


def _nonfinite_steps(records: Sequence[StepRecord]) -> list[int]:
    return [r.step for r in records if _has_nonfinite(r)]


def _latest_origin(records: Sequence[StepRecord]) -> dict | None:
    for record in reversed(records):
        if record.activations is not None and record.activations.nonfinite_origin:
            return record.activations.nonfinite_origin
    return None


# -- histograms ---------------------------------------------------------------------------
def underflow_fractions(record: StepRecord, names: Sequence[str] | None = None
                        ) -> dict[str, float]:
    """Of the non-zero finite gradient values in ``record``'s histograms (all parameters,
    or ``names``), the fractions that fp16/bf16 could not hold: ``fp16_zero`` (below
    2^-24, rounds to zero), ``fp16_subnormal`` (below 2^-14), ``bf16_zero`` (below 2^-133),
    ``bf16_subnormal`` (below 2^-126), ``fp16_overflow`` (2^16 and above). Where a limit
    lies below the histogram's first edge (``2^min_exp``), the values under that edge all
    count: an upper bound."""
    if record.hist is None:
        raise ValueError("this record has no histograms (not a histogram step)")
    rows = [record.hist[n] for n in (names if names is not None else record.hist)]
    columns = [sum(column) for column in zip(*rows)] if rows else []
    return _fractions(columns, record.min_exp)


def _fractions(columns: list[int], min_exp: int) -> dict[str, float]:
    nonzero = sum(columns[1:])
    if not nonzero:
        return dict.fromkeys(("fp16_zero", "fp16_subnormal", "bf16_zero", "bf16_subnormal",
                              "fp16_overflow"), 0.0)

    # Column k >= 1 holds floor(log2|x|) == min_exp + k - 1, column 1 also anything
    # smaller and the last column anything larger.
    def below(exponent: int) -> float:
        # |x| < 2^t: columns k <= t - min_exp (at least column 1: an upper bound there).
        last = max(1, min(len(columns) - 1, exponent - min_exp))
        return sum(columns[1:last + 1]) / nonzero

    def at_or_above(exponent: int) -> float:
        # |x| >= 2^t: columns k >= t - min_exp + 1 (at most the last: an upper bound there).
        first = max(1, min(len(columns) - 1, exponent - min_exp + 1))
        return sum(columns[first:]) / nonzero

    return {"fp16_zero": below(FP16_SUBNORMAL_EXP), "fp16_subnormal": below(FP16_NORMAL_EXP),
            "bf16_zero": below(BF16_SUBNORMAL_EXP), "bf16_subnormal": below(BF16_NORMAL_EXP),
            "fp16_overflow": at_or_above(FP16_OVERFLOW_EXP)}


# -- findings -----------------------------------------------------------------------------
def _findings(records, last_window, last: WindowDiagnosis, fit: GammaFit | None,
              origin: dict | None, underflow, latest_hist, watched) -> list[str]:
    findings: list[str] = []
    findings += _nonfinite_findings(records, last_window, origin)
    if fit is not None:
        findings += _profile_findings(fit, last.verdict)
    else:
        findings.append(f"gamma not fitted: no {MIN_LAYERS} or more layers whose names differ "
                        "only in their index (tracked modules of one class, or biases, or "
                        "weights), so the verdict reflects NaN/Inf only")
    findings += _spike_findings(records)
    findings += _saturation_findings(last_window)
    findings += _dead_findings(records, latest_hist, watched)
    if underflow is not None:
        findings += _underflow_findings(underflow, latest_hist)
    return findings


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n or ROOT_LABEL) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _nonfinite_findings(records, last_window, origin) -> list[str]:
    bad = [r for r in records if _has_nonfinite(r)]
    if not bad:
        return []
    steps = [r.step for r in bad]
    params: dict[str, int] = {}
    for record in bad:
        for name, count in record.nonfinite.items():
            params[name] = params.get(name, 0) + count
    recent = "" if any(r in last_window for r in bad) else " (none in the last window)"
    text = (f"non-finite values at {len(steps)} step(s), first {steps[0]}, last {steps[-1]}"
            f"{recent}")
    if params:
        worst = sorted(params, key=params.get, reverse=True)
        text += f"; NaN/Inf gradients in {_names(worst)}"
    findings = [text + f". Fixes: {FIXES_NONFINITE}"]
    if origin is not None:
        where = ("its forward output" if origin["phase"] == "forward" else
                 "the gradient w.r.t. its output (dL/dh), the first in backward order: made "
                 "by the backward of what consumes that output (the next layer, or the loss)")
        findings.append(f"NaN/Inf born at step {origin['step']} in module "
                        f"{origin['module'] or ROOT_LABEL!r}: {where}")
    return findings


def _profile_findings(fit: GammaFit, verdict: str) -> list[str]:
    if verdict not in ("vanishing", "exploding"):
        return []
    input_side = max(fit.roles, key=len)[:SHOWN]  # where the factor has compounded most
    direction = "shrinks" if verdict == "vanishing" else "grows"
    fixes = FIXES_VANISHING if verdict == "vanishing" else FIXES_EXPLODING
    return [f"{verdict} gradients: the gradient {direction} by gamma = {fit.gamma:.3g} per "
            f"layer towards the input ({fit.source}, {fit.depth} layers), a factor "
            f"{fit.stack_factor:.3g} across the stack; the input-side layers "
            f"({_names(input_side)}) are hit hardest. Fixes: {fixes}"]


def _spike_findings(records) -> list[str]:
    spikes, norms = [], []
    for record in records:
        norm = record.total_norm
        history = [n for n in norms[-SPIKE_LOOKBACK:] if math.isfinite(n)]
        if (len(history) >= MIN_SPIKE_HISTORY and math.isfinite(norm)
                and norm > SPIKE_FACTOR * statistics.median(history)):
            spikes.append(record.step)
        norms.append(norm)
    findings = []
    if spikes:
        shown = ", ".join(map(str, spikes[:SHOWN])) + (", ..." if len(spikes) > SHOWN else "")
        findings.append(f"total-norm spikes (over {SPIKE_FACTOR:g}x the median of the "
                        f"{SPIKE_LOOKBACK} steps before) at step {shown}: spikes over time "
                        f"point at the learning rate or the data. Fixes: {FIXES_SPIKES}")
    window = max(1, len(records) // 4)
    first = _median_finite([r.total_norm for r in records[:window]])
    latest = _median_finite([r.total_norm for r in records[-window:]])
    if len(records) >= 2 * MIN_SPIKE_HISTORY and first > 0 and latest > GROWTH_FACTOR * first:
        findings.append(f"the total gradient norm grew {latest / first:.3g}x over the run "
                        f"(median of the first and last quarters): steady growth points at "
                        f"instability. Fixes: {FIXES_EXPLODING}")
    return findings


def _saturation_findings(last_window) -> list[str]:
    by_module: dict[str, list[float]] = {}
    for record in last_window:
        if record.activations is None:
            continue
        for name, figures in record.activations.modules.items():
            if figures.saturated is not None:
                by_module.setdefault(name, []).append(figures.saturated)
    saturated = {name: statistics.median(v) for name, v in by_module.items()
                 if statistics.median(v) > SATURATED_FRACTION}
    if not saturated:
        return []
    worst = sorted(saturated, key=saturated.get, reverse=True)
    return [f"saturated activations: {_names(worst)} with up to "
            f"{saturated[worst[0]]:.0%} of outputs in the flat part of the curve, where "
            f"almost no gradient passes. Fixes: {FIXES_SATURATION}"]


def _dead_findings(records, latest_hist, watched) -> list[str]:
    findings = []
    latest = records[-1]
    zero = [name for name, norm in latest.norms.items() if norm == 0]
    if zero:
        findings.append(f"all-zero gradients at step {latest.step} in {_names(zero)}: dead "
                        f"units or a layer cut off from the loss. Fixes: {FIXES_DEAD}")
    seen = dict.fromkeys(name for r in records for name in r.norms)
    if watched is not None:
        seen.update(dict.fromkeys(watched))
    missing = [name for name in seen if name not in latest.norms]
    if missing:
        findings.append(f"no gradient at step {latest.step} for {_names(missing)}: unused in "
                        "forward, frozen, or detached from the loss")
    if latest_hist is not None:
        mostly_zero = {}
        for name, counts in latest_hist.hist.items():
            total = sum(counts)
            if total and counts[0] / total > DEAD_ZERO_FRACTION and name not in zero:
                mostly_zero[name] = counts[0] / total
        if mostly_zero:
            worst = sorted(mostly_zero, key=mostly_zero.get, reverse=True)
            findings.append(f"mostly exact-zero gradients at step {latest_hist.step} in "
                            f"{_names(worst)} (up to {mostly_zero[worst[0]]:.0%} of entries): "
                            f"dead units. Fixes: {FIXES_DEAD}")
    return findings


def _underflow_findings(underflow: dict[str, float], record: StepRecord) -> list[str]:
    findings = []
    if max(underflow["fp16_zero"], underflow["fp16_subnormal"]) > UNDERFLOW_FRACTION:
        per_param = {name: underflow_fractions(record, [name])["fp16_subnormal"]
                     for name in record.hist}
        worst = sorted((n for n in per_param if per_param[n] > UNDERFLOW_FRACTION),
                       key=per_param.get, reverse=True)
        findings.append(
            f"fp16 underflow at step {record.step}: {underflow['fp16_zero']:.1%} of non-zero "
            f"gradient values are below 2^-24 (they would become 0) and "
            f"{underflow['fp16_subnormal']:.1%} below 2^-14 (subnormal), most in "
            f"{_names(worst)}. Fixes: {FIXES_UNDERFLOW}")
    if underflow["bf16_zero"] > UNDERFLOW_FRACTION:
        findings.append(f"bf16 underflow at step {record.step}: {underflow['bf16_zero']:.1%} "
                        "of non-zero gradient values below 2^-133 (an upper bound when the "
                        "histogram starts above it): keep these gradients in fp32")
    if underflow["fp16_overflow"] > 0:
        findings.append(f"fp16 overflow at step {record.step}: {underflow['fp16_overflow']:.2%} "
                        "of gradient values are 2^16 or more (fp16 tops out at 65504): "
                        "use bf16, or clip before casting")
    return findings


def _median_finite(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan

