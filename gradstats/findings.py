"""The findings of :func:`gradstats.diagnose`: readable sentences naming the steps,
parameters or layers concerned and the usual fixes, one function per kind of problem.

Thresholds, and why:

- ``SPIKE_FACTOR = 5`` over the median of the ``SPIKE_LOOKBACK = 20`` steps before (at
  least ``MIN_SPIKE_HISTORY = 5``): a total norm five times its recent level is far outside
  the step-to-step noise of a stable run (usually well under 2x), and is how loss spikes
  announce themselves.
- ``GROWTH_FACTOR = 10``: the median total norm of the last quarter of the records over that
  of the first quarter (quarters of the whole run, not windows). Tenfold is an order of
  magnitude, as for ``STACK_FACTOR``: norms settling after warm-up move by a few times,
  while steady tenfold growth is how a run heads for divergence.
- ``SATURATED_FRACTION = 0.1``: more than a tenth of a sigmoid/tanh-like layer's outputs in
  the flat part of the curve (see :data:`gradstats.activations.SATURATION_MARGIN`).
- ``DEAD_ZERO_FRACTION = 0.5``: more than half of a gradient's entries exactly zero (from the
  histogram's zero column): with a batch, an entry is exactly zero only when the unit it
  feeds passed no gradient for any example (dead ReLU units, unused rows). Not applied to
  embedding tables (``nn.Embedding``/``nn.EmbeddingBag`` parameters, known from the model
  or the tracked activations, else by name: a module named ``*emb*``, ``wte`` or ``wpe``):
  only the rows of the tokens in the batch get a gradient, so zero rows are normal there.
- ``UNDERFLOW_FRACTION = 0.01``: more than 1% of the non-zero gradient values past a
  fp16/bf16 limit (see :mod:`gradstats.underflow`), counted only where the histogram
  places the limit; where it cannot, the finding gives the bounds, or says it cannot tell.
"""
from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence

from .record import ROOT_LABEL, StepRecord, module_of
from .underflow import underflow_bounds

SPIKE_FACTOR = 5.0
SPIKE_LOOKBACK = 20
MIN_SPIKE_HISTORY = 5
GROWTH_FACTOR = 10.0
SATURATED_FRACTION = 0.1
DEAD_ZERO_FRACTION = 0.5
UNDERFLOW_FRACTION = 0.01
SHOWN = 5  # names shown per finding

# Module classes whose parameters are tables read row by row (see DEAD_ZERO_FRACTION).
SPARSE_ROW_KINDS = ("Embedding", "EmbeddingBag")
# Their usual names, for logs that do not say the class: tok_emb, embed_tokens, wte, wpe.
SPARSE_ROW_NAME = re.compile(r"emb|^wte$|^wpe$", re.IGNORECASE)

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


def has_nonfinite(record: StepRecord) -> bool:
    if record.nonfinite or not math.isfinite(record.total_norm):
        return True
    return record.activations is not None and record.activations.nonfinite_origin is not None


def median_finite(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def names_shown(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n or ROOT_LABEL) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


# -- non-finite values --------------------------------------------------------------------
def nonfinite_findings(records, last_window, first_origin, latest_origin) -> list[str]:
    bad = [r for r in records if has_nonfinite(r)]
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
        text += f"; NaN/Inf gradients in {names_shown(worst)}"
    findings = [text + f". Fixes: {FIXES_NONFINITE}"]
    if first_origin is not None:
        text = (f"NaN/Inf first born at step {first_origin['step']} in module "
                f"{first_origin['module'] or ROOT_LABEL!r}: {_where(first_origin)}")
        if latest_origin is not None and _place(latest_origin) != _place(first_origin):
            text += (f"; the latest, at step {latest_origin['step']}, in module "
                     f"{latest_origin['module'] or ROOT_LABEL!r} ({latest_origin['phase']})")
        findings.append(text)
    return findings


def _place(origin: dict) -> tuple:
    return origin["module"], origin["phase"], bool(origin.get("from_loss"))


def _where(origin: dict) -> str:
    if origin["phase"] == "forward":
        return "its forward output"
    if origin.get("from_loss"):
        return ("the gradient the loss hands the model's output (dL/dh of the last module) "
                "while every forward output was finite: the loss is non-finite or has a "
                "non-finite gradient (log/sqrt/division near 0 in the loss function), or, "
                "under GradScaler, the scaled loss overflowed")
    return ("the gradient w.r.t. its output (dL/dh), the first in backward order: made "
            "by the backward of what consumes that output (the next layer, or the loss)")


# -- the profile --------------------------------------------------------------------------
def profile_findings(fit, profile_verdict: str) -> list[str]:
    """The vanishing/exploding finding from the fitted profile, whatever the window's
    verdict (a window with NaN/Inf is fitted from its finite steps)."""
    if profile_verdict not in ("vanishing", "exploding"):
        return []
    input_side = max(fit.roles, key=len)[:SHOWN]  # where the factor has compounded most
    direction = "shrinks" if profile_verdict == "vanishing" else "grows"
    fixes = FIXES_VANISHING if profile_verdict == "vanishing" else FIXES_EXPLODING
    return [f"{profile_verdict} gradients: the gradient {direction} by gamma = {fit.gamma:.3g} "
            f"per layer towards the input ({fit.source}, {fit.depth} layers), a factor "
            f"{fit.stack_factor:.3g} across the stack; the input-side layers "
            f"({names_shown(input_side)}) are hit hardest. Fixes: {fixes}"]


# -- over time ----------------------------------------------------------------------------
def spike_findings(records) -> list[str]:
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
    quarter = max(1, len(records) // 4)
    first = median_finite([r.total_norm for r in records[:quarter]])
    latest = median_finite([r.total_norm for r in records[-quarter:]])
    if len(records) >= 2 * MIN_SPIKE_HISTORY and first > 0 and latest > GROWTH_FACTOR * first:
        findings.append(f"the total gradient norm grew {latest / first:.3g}x over the run "
                        f"(median of the first and last quarters): steady growth points at "
                        f"instability. Fixes: {FIXES_EXPLODING}")
    return findings


# -- activations --------------------------------------------------------------------------
def saturation_findings(last_window) -> list[str]:
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
    return [f"saturated activations: {names_shown(worst)} with up to "
            f"{saturated[worst[0]]:.0%} of outputs in the flat part of the curve, where "
            f"almost no gradient passes. Fixes: {FIXES_SATURATION}"]


# -- dead and missing gradients -----------------------------------------------------------
def sparse_row_modules(records) -> set[str]:
    """The modules the records' tracked activations know as embedding tables."""
    return {name for r in records if r.activations is not None
            for name, m in r.activations.modules.items() if m.kind in SPARSE_ROW_KINDS}


def is_sparse_row(parameter: str, modules: set[str]) -> bool:
    module = module_of(parameter)
    return module in modules or bool(SPARSE_ROW_NAME.search(module.rpartition(".")[2]))


def dead_findings(records, latest_hist, watched, sparse_modules: set[str]) -> list[str]:
    findings = []
    latest = records[-1]
    zero = [name for name, norm in latest.norms.items() if norm == 0]
    if zero:
        findings.append(f"all-zero gradients at step {latest.step} in {names_shown(zero)}: "
                        f"dead units or a layer cut off from the loss. Fixes: {FIXES_DEAD}")
    seen = dict.fromkeys(name for r in records for name in r.norms)
    if watched is not None:
        seen.update(dict.fromkeys(watched))
    missing = [name for name in seen if name not in latest.norms]
    if missing:
        findings.append(f"no gradient at step {latest.step} for {names_shown(missing)}: "
                        "unused in forward, frozen, or detached from the loss")
    if latest_hist is not None:
        mostly_zero = {}
        for name, counts in latest_hist.hist.items():
            total = sum(counts)
            if (total and counts[0] / total > DEAD_ZERO_FRACTION and name not in zero
                    and not is_sparse_row(name, sparse_modules)):
                mostly_zero[name] = counts[0] / total
        if mostly_zero:
            worst = sorted(mostly_zero, key=mostly_zero.get, reverse=True)
            findings.append(f"mostly exact-zero gradients at step {latest_hist.step} in "
                            f"{names_shown(worst)} (up to {mostly_zero[worst[0]]:.0%} of "
                            f"entries): dead units. Fixes: {FIXES_DEAD}")
    return findings


# -- fp16/bf16 range ----------------------------------------------------------------------
def _share(bounds: tuple[float, float], digits: int = 1) -> str:
    low, high = bounds
    if low == high:
        return f"{low:.{digits}%}"
    return f"between {low:.{digits}%} and {high:.{digits}%}"


def underflow_findings(bounds: dict[str, tuple[float, float]], record: StepRecord) -> list[str]:
    """Facts only where the histogram's lower bound passes the threshold; a note where
    only its upper bound does (the limit lies in a clamped column)."""
    findings = []
    fp16 = ("fp16_zero", "fp16_subnormal")
    if max(bounds[k][0] for k in fp16) > UNDERFLOW_FRACTION:
        per_param = {name: underflow_bounds(record, [name])["fp16_subnormal"][0]
                     for name in record.hist}
        worst = sorted((n for n in per_param if per_param[n] > UNDERFLOW_FRACTION),
                       key=per_param.get, reverse=True)
        findings.append(
            f"fp16 underflow at step {record.step}: {_share(bounds['fp16_zero'])} of non-zero "
            f"gradient values are below 2^-25 (they would become 0; those in [2^-25, 2^-24) "
            f"round either way) and {_share(bounds['fp16_subnormal'])} below 2^-14 "
            f"(subnormal), most in {names_shown(worst)}. Fixes: {FIXES_UNDERFLOW}")
    elif max(bounds[k][1] for k in fp16) > UNDERFLOW_FRACTION:
        findings.append(_cannot_tell("fp16 underflow (below 2^-14)", record))
    if bounds["bf16_zero"][0] > UNDERFLOW_FRACTION:
        findings.append(f"bf16 underflow at step {record.step}: {_share(bounds['bf16_zero'])} "
                        "of non-zero gradient values are below 2^-134 (they would become 0): "
                        "keep these gradients in fp32")
    # bf16's limits lie below any usual histogram range: where the histogram cannot tell,
    # nothing is said (values that small are rare, and a note would be in every report).
    if bounds["fp16_overflow"][0] > 0:
        findings.append(f"fp16 overflow at step {record.step}: "
                        f"{_share(bounds['fp16_overflow'], 2)} of gradient values are 2^16 or "
                        "more (fp16 tops out at 65504): use bf16, or clip before casting")
    elif bounds["fp16_overflow"][1] > 0:
        findings.append(_cannot_tell("fp16 overflow (2^16 and above)", record))
    return findings


def _cannot_tell(what: str, record: StepRecord) -> str:
    width = len(next(iter(record.hist.values())))
    return (f"{what}: cannot tell with this histogram range at step {record.step} (its first "
            f"column holds everything below 2^{record.min_exp + 1}, its last everything from "
            f"2^{record.min_exp + width - 2}); GradMonitor(min_exp=..., num_bins=...) spanning "
            "2^-26 to 2^17 would")
