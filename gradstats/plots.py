"""Figures of a run's gradients (matplotlib, the optional extra ``gradstats[plots]``).

- :func:`plot_depth_profile`: per-layer gradient norm against depth on a log axis, with the
  fitted ``gamma^(L-l)`` line: the textbook figure of vanishing/exploding gradients;
- :func:`plot_depth_heatmap`: the same profile over the steps;
- :func:`plot_histograms`: log2-magnitude histograms per module, fp16/bf16 limits marked;
- :func:`plot_total_norm`: the global norm over time, clip and non-finite events marked.

Each takes records (or a :class:`~gradstats.diagnose.Diagnosis`) and returns a
``matplotlib.figure.Figure`` built without pyplot (no global state, no display needed);
:func:`save_figures` writes them all as PNG files.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .diagnose import Diagnosis, GammaFit, diagnose, fit_gamma, load_records
from .record import StepRecord
from .underflow import (
    BF16_NORMAL_EXP,
    BF16_SUBNORMAL_EXP,
    FP16_NORMAL_EXP,
    FP16_OVERFLOW_EXP,
    FP16_SUBNORMAL_EXP,
)

__all__ = ["plot_depth_heatmap", "plot_depth_profile", "plot_depth_profiles", "plot_histograms",
           "plot_total_norm", "save_figures"]

MAX_HISTOGRAM_PANELS = 12  # modules drawn by plot_histograms when none are named

# The limits drawn on the log2 histograms: (exponent, label, line style).
FLOAT_LIMITS = (
    (FP16_SUBNORMAL_EXP, "fp16 smallest subnormal 2^-24", ":"),
    (FP16_NORMAL_EXP, "fp16 smallest normal 2^-14", "--"),
    (FP16_OVERFLOW_EXP, "fp16 max ~2^16", "-."),
    (BF16_NORMAL_EXP, "bf16 smallest normal 2^-126", "--"),
    (BF16_SUBNORMAL_EXP, "bf16 smallest subnormal 2^-133", ":"),
)


def _figure(width: float = 7.0, height: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("gradstats' plots need matplotlib: pip install 'gradstats[plots]'"
                          ) from None
    return Figure(figsize=(width, height), layout="constrained")


def plot_depth_profile(source: Diagnosis | GammaFit | Sequence[StepRecord]):
    """Per-layer gradient norm against depth (input side left), log axis, one series per
    role, with the fitted ``gamma`` as a line through the largest role.

    Args:
        source: a :class:`Diagnosis`, its ``fit``, or records (fitted here).
    """
    fit = _fit_of(source)
    figure = _figure()
    axes = figure.add_subplot()
    if fit is None:
        axes.text(0.5, 0.5, "no layer profile: fewer than 3 layers of one role",
                  ha="center", va="center", transform=axes.transAxes)
        return figure
    norms = dict(zip(fit.layers, fit.norms))
    for role in fit.roles:
        axes.plot(range(len(role)), [norms[name] for name in role], "o-", markersize=3,
                  label=_role_label(role))
    largest = max(fit.roles, key=len)
    # The fitted line: norm_l = norm_last * gamma^(L-1-l), anchored at the role's median.
    anchor = sorted(range(len(largest)), key=lambda i: norms[largest[i]])[len(largest) // 2]
    last = len(largest) - 1
    line = [norms[largest[anchor]] * fit.gamma ** (anchor - i) for i in range(last + 1)]
    axes.plot(range(last + 1), line, "k--", linewidth=1,
              label=f"fit: gamma = {fit.gamma:.3g} per layer")
    axes.set_yscale("log")
    axes.set_xlabel("depth (layer index within its role, input side first)")
    axes.set_ylabel(f"gradient norm ({fit.source})")
    axes.set_title(f"gradient norm against depth: gamma = {fit.gamma:.3g}, "
                   f"x{fit.stack_factor:.3g} across {fit.depth} layers")
    axes.legend(fontsize="small")
    return figure


def plot_depth_profiles(fits: dict[str, GammaFit]):
    """Several runs' depth profiles on one log axis, each divided by its output-side layer's
    norm (the largest role of each fit): the textbook figure of gamma^(L-l) for several
    gamma."""
    figure = _figure()
    axes = figure.add_subplot()
    for label, fit in fits.items():
        if fit is None:
            continue
        norms = dict(zip(fit.layers, fit.norms))
        role = max(fit.roles, key=len)
        last = norms[role[-1]]
        axes.plot(range(len(role)), [norms[name] / last for name in role], "-",
                  label=f"{label}: gamma = {fit.gamma:.3g}")
    axes.set_yscale("log")
    axes.set_xlabel("depth (input side first)")
    axes.set_ylabel("gradient norm / output-side norm")
    axes.set_title("gradient norm against depth")
    axes.legend(fontsize="small")
    return figure


def plot_depth_heatmap(records: Sequence[StepRecord]):
    """log10 of each fitted layer's gradient norm (rows, input side at the bottom) at every
    record (columns): how the depth profile evolves over the steps."""
    fit = fit_gamma(records)
    figure = _figure()
    axes = figure.add_subplot()
    if fit is None:
        axes.text(0.5, 0.5, "no layer profile", ha="center", va="center",
                  transform=axes.transAxes)
        return figure
    layers = max(fit.roles, key=len)
    grid = [[_log10(_layer_norm(record, fit.source, name)) for record in records]
            for name in layers]
    image = axes.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                        cmap="viridis")
    figure.colorbar(image, ax=axes, label="log10 gradient norm")
    steps = [record.step for record in records]
    ticks = sorted(set(range(0, len(steps), max(1, len(steps) // 8))))
    axes.set_xticks(ticks, [str(steps[i]) for i in ticks])
    axes.set_yticks(range(len(layers)), layers if len(layers) <= 20 else
                    [name if i % max(1, len(layers) // 10) == 0 else ""
                     for i, name in enumerate(layers)], fontsize="small")
    axes.set_xlabel("step")
    axes.set_ylabel(f"layer ({fit.source})")
    axes.set_title("gradient norm by layer over the steps")
    return figure


def plot_histograms(record: StepRecord, modules: Sequence[str] | None = None):
    """log2|g| histograms of ``record`` (a histogram step), one panel per module (the first
    ``MAX_HISTOGRAM_PANELS`` when ``modules`` is None), fp16/bf16 limits marked."""
    if record.module_hist is None:
        raise ValueError(f"step {record.step} has no histograms (not a histogram step)")
    names = list(modules) if modules is not None else list(record.module_hist)[
        :MAX_HISTOGRAM_PANELS]
    columns = 3 if len(names) > 4 else max(1, len(names))
    rows = math.ceil(len(names) / columns)
    figure = _figure(4.0 * columns, 2.6 * rows)
    lowest = record.min_exp
    highest = record.min_exp + len(next(iter(record.module_hist.values()))) - 1
    for position, name in enumerate(names, start=1):
        axes = figure.add_subplot(rows, columns, position)
        counts, edges = record.log2_buckets(record.module_hist[name])
        axes.stairs(counts, edges, fill=True)
        _mark_clamped_columns(axes, counts, edges)
        for exponent, label, style in FLOAT_LIMITS:
            if lowest <= exponent <= highest:
                axes.axvline(exponent, color="red", linestyle=style, linewidth=1, label=label)
        zeros = record.module_hist[name][0]
        axes.set_title(f"{name or '<root>'} ({zeros} exact zeros)", fontsize="small")
        axes.set_xlabel("log2 |g|", fontsize="small")
        if position == 1:
            axes.legend(fontsize="x-small")
    figure.suptitle(f"gradient magnitudes at step {record.step}")
    return figure


def _mark_clamped_columns(axes, counts: list[int], edges: list[float]) -> None:
    """Hatch the first and last columns and label them: they also hold everything below
    (above) their edges, so their height is not that of one binade."""
    if len(counts) < 2:
        return
    label_at = axes.get_xaxis_transform()  # x in data, y in axes fraction
    for position, text in ((0, f"< 2^{edges[1]:g}"), (len(counts) - 1, f">= 2^{edges[-2]:g}")):
        axes.stairs(counts[position:position + 1], edges[position:position + 2], fill=False,
                    hatch="//", color="grey")
        axes.text((edges[position] + edges[position + 1]) / 2, 0.98, text, transform=label_at,
                  ha="center", va="top", fontsize="xx-small", rotation=90)


def plot_total_norm(records: Sequence[StepRecord]):
    """The total gradient norm over the steps (log axis), steps that clipped (clip
    coefficient below 1) and steps with NaN/Inf marked."""
    figure = _figure()
    axes = figure.add_subplot()
    finite = [(r.step, r.total_norm) for r in records if math.isfinite(r.total_norm)]
    if finite:
        axes.plot(*zip(*finite), "-", linewidth=1, label="total norm")
    clipped = [(r.step, r.total_norm) for r in records
               if r.clip_coef is not None and r.clip_coef < 1 and math.isfinite(r.total_norm)]
    if clipped:
        axes.plot(*zip(*clipped), "o", markersize=3, color="orange", label="clipped")
    for index, record in enumerate(r for r in records if r.nonfinite or not
                                   math.isfinite(r.total_norm)):
        axes.axvline(record.step, color="red", linewidth=1,
                     label="NaN/Inf" if index == 0 else None)
    if finite and all(norm > 0 for _, norm in finite):
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("total gradient norm")
    axes.set_title("global gradient norm over time")
    axes.legend(fontsize="small")
    return figure


def save_figures(source, folder: str | Path, diagnosis: Diagnosis | None = None
                 ) -> list[Path]:
    """Every figure of ``source`` (what :func:`gradstats.diagnose` takes) as PNG files in
    ``folder`` (created): ``depth_profile.png``, ``depth_heatmap.png``, ``total_norm.png``,
    and ``histograms.png`` when a record has histograms. Returns the paths written."""
    records = load_records(source)
    diagnosis = diagnosis or diagnose(records)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"depth_profile.png": plot_depth_profile(diagnosis),
               "depth_heatmap.png": plot_depth_heatmap(records),
               "total_norm.png": plot_total_norm(records)}
    latest_hist = next((r for r in reversed(records) if r.module_hist is not None), None)
    if latest_hist is not None:
        figures["histograms.png"] = plot_histograms(latest_hist)
    paths = []
    for name, figure in figures.items():
        figure.savefig(folder / name, dpi=110)
        paths.append(folder / name)
    return paths


def _fit_of(source) -> GammaFit | None:
    if isinstance(source, GammaFit):
        return source
    if isinstance(source, Diagnosis):
        return source.fit
    return fit_gamma(list(source))


def _role_label(role: list[str]) -> str:
    return f"{role[0] or '<root>'} .. {role[-1]}" if len(role) > 1 else role[0]


def _layer_norm(record: StepRecord, source: str, name: str) -> float | None:
    if source == "activation gradients":
        figures = record.activations and record.activations.modules.get(name)
        return figures.grad_norm if figures else None
    suffix = "bias" if source == "bias gradients" else "weight"
    return record.norms.get(f"{name}.{suffix}" if name else suffix)


def _log10(value: float | None) -> float:
    if value is None or not 0 < value < math.inf:
        return math.nan
    return math.log10(value)
