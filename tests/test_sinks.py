"""The sinks: files that parse, dashboards that read back, clear errors for missing extras."""
import csv
import json
import logging
import math
import sys
import types

import pytest
import torch

import gradstats
from gradstats.sinks import make_sink


def record_with_nonfinite_and_histogram():
    """A record from a real step: one NaN, one Inf, histograms."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    model(torch.randn(3, 6)).sum().backward()
    model[0].bias.grad[0] = float("nan")
    model[1].weight.grad[1, 1] = float("inf")
    records = []
    with gradstats.GradMonitor(model, sinks=[types.SimpleNamespace(write=records.append)],
                               hist_every=1, on_nonfinite="ignore", num_bins=16,
                               min_exp=-12) as monitor:
        monitor.step(max_norm=1.0)
    return records[0]


@pytest.fixture(scope="module")
def record():
    return record_with_nonfinite_and_histogram()


def strict_json(line):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


def test_jsonl_lines_are_strict_json_with_every_field(tmp_path, record):
    sink = make_sink(f"jsonl:{tmp_path}/deep/dir/g.jsonl")
    sink.write(record)
    sink.write(record)
    sink.close()
    lines = (tmp_path / "deep/dir/g.jsonl").read_text().splitlines()
    assert len(lines) == 2
    data = strict_json(lines[0])
    assert data["step"] == 0 and data["total_norm"] == "nan" and data["clip_coef"] == "nan"
    assert data["nonfinite"] == {"0.bias": 1, "1.weight": 1}
    assert data["norms"]["0.bias"] == "nan" and data["norms"]["1.weight"] == "inf"
    assert data["norms"]["0.weight"] == pytest.approx(record.norms["0.weight"])
    assert data["module_nonfinite"] == {"0": 1, "1": 1}
    assert len(data["bin_edges"]) == 17 and data["bin_edges"][1] == 2.0 ** -12
    assert data["hist"]["0.weight"] == record.hist["0.weight"]
    assert data["module_hist"] == record.module_hist


@pytest.mark.parametrize("how, steps", [({"append": True}, [-1, 0]), ({"overwrite": True}, [0]),
                                        ("jsonl+append", [-1, 0]), ("jsonl+overwrite", [0])])
def test_jsonl_appends_or_overwrites_only_when_told(tmp_path, record, how, steps):
    from gradstats.sinks import JsonlSink

    path = tmp_path / "g.jsonl"
    path.write_text('{"step": -1}\n')
    sink = make_sink(f"{how}:{path}") if isinstance(how, str) else JsonlSink(path, **how)
    sink.write(record)
    sink.close()
    assert [strict_json(line)["step"] for line in path.read_text().splitlines()] == steps


def test_jsonl_bin_edges_beyond_float64_stay_strict_json(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model(torch.randn(2, 3)).sum().backward()
    with gradstats.GradMonitor(model, sinks=f"jsonl:{tmp_path}/g.jsonl", hist_every=1,
                               min_exp=1000, num_bins=64) as monitor:
        monitor.step()
    edges = strict_json((tmp_path / "g.jsonl").read_text())["bin_edges"]
    assert edges[1] == 2.0 ** 1000 and edges[-1] == "inf"


def test_csv_rows_parse_with_a_header_once(tmp_path, record):
    path = tmp_path / "g.csv"
    from gradstats.sinks.csv_rows import CsvSink

    for _ in range(2):  # a second sink appending to the file writes no second header
        sink = CsvSink(path, append=True)
        sink.write(record)
        sink.close()
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2 * (1 + 2 + 4)  # total + modules + parameters, twice
    total = rows[0]
    assert total["scope"] == "total" and math.isnan(float(total["norm"]))
    assert total["nonfinite"] == "2"
    by_name = {(r["scope"], r["name"]): r for r in rows[:7]}
    assert float(by_name["parameter", "0.weight"]["norm"]) == record.norms["0.weight"]
    assert by_name["parameter", "1.weight"]["nonfinite"] == "1"
    assert by_name["module", "1"]["norm"] == "inf"


def test_tensorboard_files_read_back_with_tensorboards_own_reader(tmp_path, record):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = make_sink(f"tensorboard:{tmp_path}")
    sink.write(record)
    sink.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"grad_norm/total", "grad_norm/clip_coef", "grad_nonfinite/total",
            "grad_norm/module/0", "grad_nonfinite/module/1"} <= set(tags["scalars"])
    assert math.isnan(events.Scalars("grad_norm/total")[0].value)
    assert events.Scalars("grad_nonfinite/total")[0].value == 2
    assert events.Scalars("grad_norm/module/0")[0].value == pytest.approx(
        record.module_norms["0"], nan_ok=True)
    assert sorted(tags["histograms"]) == ["grad_log2_abs/module/0", "grad_log2_abs/module/1"]
    histogram = events.Histograms("grad_log2_abs/module/0")[0].histogram_value
    counts = record.module_hist["0"][1:]  # finite non-zero values, one bucket per power of 2
    assert list(histogram.bucket) == counts
    assert list(histogram.bucket_limit) == [float(-12 + k) for k in range(1, 16)]
    assert histogram.num == sum(counts) == 6 * 4 + 4 - 1


def hide_module(monkeypatch, *names):
    for name in list(sys.modules):
        if any(name == n or name.startswith(n + ".") for n in names):
            monkeypatch.delitem(sys.modules, name)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_missing_tensorboard_is_a_clear_error(monkeypatch, tmp_path):
    hide_module(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    with pytest.raises(ImportError, match=r"'tensorboard' sink needs the 'tensorboard' package.*"
                                          r"pip install tensorboard"):
        make_sink(f"tensorboard:{tmp_path}")


def test_missing_wandb_is_a_clear_error(monkeypatch):
    hide_module(monkeypatch, "wandb")
    with pytest.raises(ImportError, match=r"pip install 'gradstats\[wandb\]'"):
        make_sink("wandb")


class FakeWandb(types.ModuleType):
    """The two pieces of wandb the sink uses: the active run's log() and Histogram."""

    class Histogram:
        def __init__(self, np_histogram):
            counts, edges = np_histogram
            assert len(edges) == len(counts) + 1
            self.counts, self.edges = counts, edges

    def __init__(self, active):
        super().__init__("wandb")
        self.logged, self.metrics = [], {}
        self.run = types.SimpleNamespace(
            log=self.logged.append,
            define_metric=lambda name, step_metric=None: self.metrics.update({name: step_metric}))
        if not active:
            self.run = None


def test_wandb_logs_scalars_and_log2_histograms(monkeypatch, record):
    fake = FakeWandb(active=True)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = make_sink("wandb")
    sink.write(record)
    [data] = fake.logged
    assert data["gradstats/step"] == 0  # its own x-axis: late records are not dropped
    assert fake.metrics["grad_norm/*"] == "gradstats/step"
    assert data["grad_nonfinite/total"] == 2 and math.isnan(data["grad_norm/total"])
    histogram = data["grad_log2_abs/module/1"]
    assert histogram.counts == record.module_hist["1"][1:]
    assert histogram.edges[0] == -12.0 and histogram.edges[-1] == 3.0


def test_wandb_without_a_run_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(active=False))
    with pytest.raises(RuntimeError, match=r"call wandb.init\(\)"):
        make_sink("wandb")


def test_logging_sink_names_the_nonfinite_parameters(caplog, record):
    with caplog.at_level(logging.INFO, logger="gradstats"):
        make_sink("logging").write(record)
    [message] = caplog.messages
    assert message.startswith("step 0: total_norm nan clip_coef nan nonfinite 2; largest: 0 nan")
    assert message.endswith("NaN/Inf in 0.bias, 1.weight")


def test_a_module_named_total_does_not_shadow_the_total():
    model = torch.nn.Module()
    model.total = torch.nn.Linear(3, 1)
    model.clip_coef = torch.nn.Linear(3, 1)
    (model.total(torch.ones(1, 3)) + 5 * model.clip_coef(torch.ones(1, 3))).sum().backward()
    records = []
    with gradstats.GradMonitor(model, sinks=[types.SimpleNamespace(write=records.append)]) as m:
        total = m.step(max_norm=1.0).item()
    scalars = records[0].scalars()
    assert scalars["grad_norm/total"] == pytest.approx(total)
    assert scalars["grad_norm/module/total"] < total
    assert scalars["grad_norm/clip_coef"] == pytest.approx(1 / (total + 1e-6))


def test_custom_sink_objects_are_used_as_they_are():
    sink = types.SimpleNamespace(write=lambda record: None)  # no close(): fine
    assert make_sink(sink) is sink
    with pytest.raises(TypeError, match="write"):
        make_sink(object())
