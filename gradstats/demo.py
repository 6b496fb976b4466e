"""Vanishing and exploding gradients made visible (``make demo``, ``python -m gradstats demo``).

A small model zoo (``gradstats.demo_models``) is trained for a few steps on synthetic data,
each under a ``GradMonitor`` that tracks activations: the textbook deep linear nets (100
orthogonal layers scaled by gamma = 0.95, 1.00, 1.05: vanishes, survives, explodes), a deep
sigmoid MLP, ReLU MLPs with too-large and with He init, a pre-LayerNorm residual stack, and a
vanilla RNN against a gated one (GRU) over a long sequence. Every step one fused pass computes
all gradient statistics and clips; the records reach the sinks (a progress bar here, a JSONL
file per model) without a host sync. Then :func:`gradstats.diagnose` reads each log, and the
demo writes a report per model (``report.md`` and figures when matplotlib is installed), a
summary ``report.md`` with the textbook figure, and prints the verdict table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import gradstats
from gradstats.demo_models import Case, cases
from gradstats.report import write_report


class ProgressBar:
    """A custom sink: redraws one progress line per record as it reaches the host. Any
    object with ``write(record)`` can be a sink."""

    def __init__(self, label: str, steps: int, stream=None):
        # None: sys.stderr as it is when written to (a redirect made later is followed).
        self.label, self.steps, self._stream = label, steps, stream

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    def write(self, record: gradstats.StepRecord) -> None:
        done = record.step + 1
        filled = round(20 * done / self.steps)
        self.stream.write(f"\r  {self.label:<24} [{'#' * filled}{'.' * (20 - filled)}] "
                          f"{done}/{self.steps}  grad norm {record.total_norm:9.3g}")
        if done == self.steps:
            self.stream.write("\n")
        self.stream.flush()


def train(case: Case, seed: int, steps: int, out: Path, device: torch.device):
    """A few clipped SGD steps under a monitor; the log's path and its diagnosis."""
    torch.manual_seed(seed)
    model = case.build().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    log = out / f"{case.name}.jsonl"
    sinks = [ProgressBar(case.name, steps), f"jsonl+overwrite:{log}"]
    with gradstats.GradMonitor(model, sinks=sinks, track_activations=True,
                               hist_every=steps - 1, on_nonfinite="ignore") as monitor:
        for _ in range(steps):
            inputs, targets = (t.to(device) for t in case.batch(generator))
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            monitor.step(max_norm=1.0)
            optimizer.step()
        diagnosis = gradstats.diagnose(monitor, window=steps)
    return log, diagnosis


def summary(rows, textbook: Path | None) -> str:
    lines = ["# gradstats demo: vanishing and exploding gradients", "",
             "| model | expected | verdict | gamma | fitted from | report |",
             "|---|---|---|---:|---|---|"]
    for case, diagnosis in rows:
        gamma = "" if diagnosis.gamma is None else f"{diagnosis.gamma:.3f}"
        lines.append(f"| {case.name} | {case.expected} | {diagnosis.verdict} | {gamma} | "
                     f"{diagnosis.gamma_source or ''} | [report]({case.name}/report.md) |")
    lines += ["", "What each model shows:", ""]
    lines += [f"- **{case.name}**: {case.why}" for case, _ in rows]
    if textbook is not None:
        lines += ["", f"![the textbook figure]({textbook.name})"]
    return "\n".join(lines) + "\n"


def verdict_table(rows) -> str:
    header = f"{'model':<24} {'expected':<10} {'verdict':<10} {'gamma':>7}  fitted from"
    lines = [header, "-" * len(header)]
    for case, diagnosis in rows:
        gamma = "" if diagnosis.gamma is None else f"{diagnosis.gamma:.3f}"
        mark = "" if diagnosis.verdict == case.expected else "  (unexpected)"
        lines.append(f"{case.name:<24} {case.expected:<10} {diagnosis.verdict:<10} "
                     f"{gamma:>7}  {diagnosis.gamma_source or ''}{mark}")
    return "\n".join(lines)


def textbook_figure(rows, out: Path) -> Path | None:
    """The deep linear nets' profiles on one axis (needs matplotlib)."""
    try:
        from gradstats.plots import plot_depth_profiles
    except ImportError:
        return None
    fits = {case.name: diagnosis.fit for case, diagnosis in rows
            if case.name.startswith("linear-")}
    try:
        figure = plot_depth_profiles(fits)
    except ImportError:
        return None
    path = out / "textbook.png"
    figure.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None, prog: str = "python -m gradstats demo") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="folder for the logs and reports (default: runs/demo; the "
                             "demo's own files there are replaced)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per model "
                        "(default: 8)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller models (for tests): the same verdicts, faster")
    parser.add_argument("--no-plots", action="store_true", help="reports without figures")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)

    zoo = cases(quick=args.quick)
    print(f"device {device}; {len(zoo)} models, {args.steps} steps each; writing to {args.out}")
    rows = []
    for seed, case in enumerate(zoo):
        log, diagnosis = train(case, seed, args.steps, args.out, device)
        write_report(log, args.out / case.name, diagnosis=diagnosis, plots=not args.no_plots)
        rows.append((case, diagnosis))
    textbook = None if args.no_plots else textbook_figure(rows, args.out)
    (args.out / "report.md").write_text(summary(rows, textbook), encoding="utf-8")
    print()
    print(verdict_table(rows))
    print(f"\nreports: {args.out / 'report.md'} (one folder per model)"
          + ("" if textbook or args.no_plots else
             "; figures need matplotlib: pip install 'gradstats[plots]'"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
