"""A Markdown report of a run's gradients: the diagnosis, its history and the figures.

``python -m gradstats report LOG.jsonl`` writes it for any run the monitor logged.
"""
from __future__ import annotations

import math
from pathlib import Path

from .diagnose import Diagnosis, diagnose, load_records

__all__ = ["write_report"]


def write_report(source, folder: str | Path, *, window: int = 10, plots: bool = True,
                 diagnosis: Diagnosis | None = None) -> Path:
    """Diagnose ``source`` (what :func:`gradstats.diagnose` takes; ``diagnosis`` when it was
    done already) and write ``folder/report.md``, with the figures of
    :func:`gradstats.plots.save_figures` beside it when ``plots`` and matplotlib is
    installed. Returns the report's path."""
    label = f"`{source}`" if isinstance(source, (str, Path)) else type(source).__name__
    records = load_records(source)
    diagnosis = diagnosis or diagnose(records, window=window)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    note = None
    if plots:
        try:
            from .plots import save_figures
            figures = save_figures(records, folder, diagnosis)
        except ImportError as error:
            note = str(error)
    path = folder / "report.md"
    path.write_text(render(diagnosis, label, figures, note), encoding="utf-8")
    return path


def render(diagnosis: Diagnosis, label: str, figures: list[Path], note: str | None) -> str:
    """The report's Markdown text."""
    steps = diagnosis.steps
    lines = [f"# Gradient report: {diagnosis.verdict}", "",
             f"From {label}: {len(steps)} records, steps {steps[0]} to {steps[-1]}.", ""]
    if diagnosis.gamma is not None:
        lines.append(f"- **gamma** = {diagnosis.gamma:.4g} per layer over {diagnosis.fit.depth} "
                     f"layers (from {diagnosis.gamma_source}), a factor "
                     f"{diagnosis.fit.stack_factor:.3g} from the output side to the input side")
    else:
        lines.append("- **gamma**: not fitted (no role with 3 or more layers)")
    if diagnosis.caveat:
        lines.append(f"- caveat: {diagnosis.caveat}")
    lines += ["", "## Findings", ""]
    lines += [f"- {finding}" for finding in diagnosis.findings] or ["- nothing to report"]
    lines += ["", "## History", "",
              "| steps | verdict | gamma | median total norm | NaN/Inf steps |",
              "|---|---|---:|---:|---|"]
    for window in diagnosis.history:
        gamma = "" if window.gamma is None else f"{window.gamma:.4g}"
        norm = "" if math.isnan(window.median_total_norm) else f"{window.median_total_norm:.4g}"
        bad = ", ".join(map(str, window.nonfinite_steps[:10]))
        lines.append(f"| {window.first_step}-{window.last_step} | {window.verdict} | {gamma} "
                     f"| {norm} | {bad} |")
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{path.stem}]({path.name})" for path in figures]
    if note:
        lines += ["", f"(no figures: {note})"]
    return "\n".join(lines) + "\n"
