"""The demo (``make demo``, ``python -m gradstats demo``) runs end to end: every model of
the zoo gets the verdict the literature predicts, and the logs and reports are written."""
import io
import json
import sys

import pytest

import gradstats
from gradstats import demo
from gradstats.__main__ import main as cli
from gradstats.demo_models import cases


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--quick", "--steps", "3", "--no-plots", "--out", str(out)]) == 0
    return out


def test_every_model_gets_its_expected_verdict(quick_demo):
    summary = (quick_demo / "report.md").read_text()
    for case in cases(quick=True):
        assert f"| {case.name} | {case.expected} | {case.expected} |" in summary


def test_every_model_has_a_log_of_every_step_and_a_report(quick_demo):
    for case in cases(quick=True):
        records = [json.loads(line) for line in
                   (quick_demo / f"{case.name}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 1, 2]
        assert "activations" in records[0] and "hist" in records[2]
        report = (quick_demo / case.name / "report.md").read_text()
        assert report.startswith("# Gradient report: ")


def test_cli_passes_demo_options_to_the_demo(monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "main", lambda argv, prog: seen.append(argv) or 0)
    assert cli(["demo", "--quick", "--out", "x"]) == 0
    assert seen == [["--quick", "--out", "x"]]


def test_demo_figures_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    assert demo.main(["--quick", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "textbook.png").stat().st_size > 1000
    assert (tmp_path / "sigmoid-mlp" / "depth_profile.png").stat().st_size > 1000


def test_console_script_names_itself_in_usage_lines(monkeypatch, capsys):
    from gradstats.__main__ import console_main

    monkeypatch.setattr(sys, "argv", ["gradstats", "no-such-command"])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("usage: gradstats ")


def test_progress_bar_writes_to_stderr_as_it_is_when_written(monkeypatch):
    bar = demo.ProgressBar("case", steps=2)
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)  # a redirect made after the bar was
    bar.write(gradstats.StepRecord(step=0, total_norm=1.0, clip_coef=None, norm_type=2.0,
                                   norms={}, nonfinite={}, module_norms={},
                                   module_nonfinite={}))
    assert "case" in later.getvalue() and "1/2" in later.getvalue()
