"""The report (`python -m gradstats report LOG.jsonl`) and the figures, end to end."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monitor_helpers import ListSink
from torch import nn

import gradstats
from gradstats.__main__ import main
from gradstats.report import write_report

REPO = Path(__file__).resolve().parents[1]


def tanh_run(path, steps=12):
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(16, 1))
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink, f"jsonl:{path}"], hist_every=5,
                               track_activations=True, on_nonfinite="ignore") as monitor:
        for step in range(steps):
            model.zero_grad()
            model(torch.randn(8, 16)).square().mean().backward()
            if step == 7:
                model[0].bias.grad[0] = math.nan
            monitor.step(max_norm=0.01)
    return sink.records


def test_report_without_plots_holds_the_verdict_findings_and_history(tmp_path):
    log = tmp_path / "run.jsonl"
    tanh_run(log)
    path = write_report(log, tmp_path / "out", window=5, plots=False)
    text = path.read_text()
    assert text.startswith("# Gradient report: ")
    assert "**gamma**" in text and "activation gradients" in text
    assert "| 0-1 |" in text and "| 2-6 | vanishing |" in text
    assert "| 7-11 | nonfinite |" in text and text.startswith("# Gradient report: nonfinite")
    assert "'0.bias'" in text  # the NaN finding names the parameter
    assert list((tmp_path / "out").iterdir()) == [path]


def test_cli_report_writes_a_report_and_prints_the_verdict(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    tanh_run(log)
    assert main(["report", str(log), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("verdict: ")
    report = tmp_path / "run-report" / "report.md"
    assert report.stat().st_size > 0 and str(report) in out


def test_cli_report_of_an_empty_log_is_an_error_not_a_traceback(tmp_path):
    log = tmp_path / "empty.jsonl"
    log.write_text("")
    result = subprocess.run([sys.executable, "-m", "gradstats", "report", str(log)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert "no records" in result.stderr and "Traceback" not in result.stderr


def test_figures_are_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "run.jsonl"
    records = tanh_run(log)
    path = write_report(log, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"report.md", "depth_profile.png", "depth_heatmap.png", "total_norm.png",
                     "histograms.png"}
    assert all((tmp_path / "out" / n).stat().st_size > 1000 for n in names - {"report.md"})
    assert "![depth_profile](depth_profile.png)" in path.read_text()
    from gradstats import plots
    figure = plots.plot_depth_profile(records)
    fitted = figure.axes[0].get_lines()[-1]
    assert "gamma = " in fitted.get_label()
    with pytest.raises(ValueError, match="no histograms"):
        plots.plot_histograms(records[1])


def test_histogram_panels_label_the_clamped_end_columns(tmp_path):
    pytest.importorskip("matplotlib")
    from gradstats import plots
    records = tanh_run(tmp_path / "run.jsonl", steps=1)
    figure = plots.plot_histograms(records[0], modules=["0"])
    texts = [t.get_text() for t in figure.axes[0].texts]
    # Column 1 holds everything below 2^(min_exp + 1), the last everything from its edge.
    assert texts == ["< 2^-39", ">= 2^22"]
