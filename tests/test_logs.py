"""Reading the logs back: read_jsonl returns exactly what the JSONL sink wrote."""
import csv
import dataclasses
import math
import pathlib

import pytest
from monitor_helpers import ListSink, backward, poison, tiny_model

import gradstats


def same_value(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_read_jsonl_round_trips_every_field_of_what_the_monitor_wrote(tmp_path, norm_type):
    model = tiny_model()
    path = tmp_path / "g.jsonl"
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink, f"jsonl:{path}"], hist_every=2,
                               on_nonfinite="ignore", norm_type=norm_type, num_bins=20,
                               min_exp=-16) as monitor:
        for step in range(4):
            model.zero_grad()
            backward(model, step)
            if step == 1:
                poison(model, "0.bias")
                poison(model, "2.weight", float("-inf"))
            monitor.step(max_norm=0.5 if step % 2 else None)
    records = gradstats.read_jsonl(path)
    assert len(records) == len(sink.records) == 4
    for read, written in zip(records, sink.records):
        for field in dataclasses.fields(gradstats.StepRecord):
            ours, theirs = getattr(read, field.name), getattr(written, field.name)
            assert same_value(ours, theirs), field.name
    assert math.isnan(records[1].norms["0.bias"]) and records[1].nonfinite == {
        "0.bias": 1, "2.weight": 1}
    assert records[2].log2_buckets(records[2].module_hist["0"])[1][0] == -16.0


def test_read_jsonl_skips_torn_and_foreign_lines_with_one_warning(tmp_path):
    model = tiny_model()
    path = tmp_path / "g.jsonl"
    with gradstats.GradMonitor(model, sinks=[f"jsonl:{path}"]) as monitor:
        for step in range(2):
            backward(model, step)
            monitor.step()
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:30], "not json", '{"step": 3}', lines[1]])
                    + "\n")
    with pytest.warns(RuntimeWarning, match=r"skipped 3 unreadable line\(s\) .* \(line 2, 3, 4\)"):
        records = gradstats.read_jsonl(path)
    assert [r.step for r in records] == [0, 1]


def test_records_to_rows_are_the_csv_rows(tmp_path):
    model = tiny_model()
    backward(model, 0)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink, f"csv:{tmp_path}/g.csv"]) as monitor:
        monitor.step(max_norm=1.0)
    rows = gradstats.records_to_rows(sink.records)
    table = list(csv.DictReader(open(tmp_path / "g.csv")))
    assert [(r["scope"], r["name"]) for r in rows] == [(r["scope"], r["name"]) for r in table]
    assert [r["norm"] for r in rows] == [float(r["norm"]) for r in table]
    assert rows[0]["clip_coef"] == float(table[0]["clip_coef"]) and rows[1]["clip_coef"] is None
    modules = gradstats.records_to_rows(sink.records, scope="module")
    assert [r["name"] for r in modules] == ["0", "1.1", "2"]
    with pytest.raises(ValueError, match="scope must be one of"):
        gradstats.records_to_rows(sink.records, scope="layer")


def test_sink_classes_import_from_gradstats_sinks_without_loading_tensorboard():
    import subprocess
    import sys

    code = ("import sys, gradstats; from gradstats.sinks import JsonlSink, CsvSink, "
            "LoggingSink, Sink, TensorBoardSink, WandbSink; "
            "print('tensorboard' in sys.modules, issubclass(JsonlSink, Sink))")
    root = pathlib.Path(__file__).resolve().parents[1]  # this checkout's gradstats
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root).stdout
    assert out.split() == ["False", "True"]
