"""GradMonitor: what it logs, when, and what NaN/Inf gradients make it do."""
import json
import logging
import math
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from helpers import as_float64, norm_rtol, np_histogram, np_norm, np_total_norm
from monitor_helpers import ListSink, assert_same, backward, poison, snapshot, tiny_model

import gradstats
from gradstats.record import combine_norms, module_of


def expected_record(model, p, num_bins=64, min_exp=-40):
    """Independent float64 figures for the model's current gradients."""
    grads = {name: as_float64(q.grad) for name, q in model.named_parameters()}
    modules = {}
    for name, values in grads.items():
        modules.setdefault(module_of(name), []).append(values)
    return {
        "norms": {name: np_norm(v, p) for name, v in grads.items()},
        "total": np_total_norm(list(grads.values()), p),
        "module_norms": {m: np_norm(np.concatenate(vs), p) for m, vs in modules.items()},
        "hist": {name: np_histogram(v, num_bins, min_exp).tolist() for name, v in grads.items()},
        "module_hist": {m: np_histogram(np.concatenate(vs), num_bins, min_exp).tolist()
                        for m, vs in modules.items()},
    }


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_logged_values_equal_the_gradients_statistics(backend_device, p):
    model = tiny_model(backend_device)
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink], norm_type=p, hist_every=2)
    expected = []
    for step in range(3):
        model.zero_grad()
        backward(model, step)
        expected.append(expected_record(model, p))
        total = monitor.step()
        np.testing.assert_allclose(total.item(), expected[-1]["total"], rtol=1e-5)
    monitor.close()
    assert [r.step for r in sink.records] == [0, 1, 2]
    rtol = norm_rtol(torch.float32, p, backend_device)
    for record, want in zip(sink.records, expected):
        assert record.norms.keys() == want["norms"].keys()
        np.testing.assert_allclose(list(record.norms.values()), list(want["norms"].values()),
                                   rtol=rtol)
        np.testing.assert_allclose(record.total_norm, want["total"], rtol=rtol)
        assert record.module_norms.keys() == {"0", "1.1", "2"}
        for module, norm in want["module_norms"].items():
            np.testing.assert_allclose(record.module_norms[module], norm, rtol=rtol)
        assert record.nonfinite == {} and record.module_nonfinite == {}
        assert record.clip_coef is None
        if record.step % 2 == 0:
            assert record.hist == want["hist"]
            assert record.module_hist == want["module_hist"]
            assert record.bin_edges == gradstats.grad_stats(model).bin_edges().tolist()
        else:
            assert record.hist is None and record.module_hist is None


def test_step_clips_exactly_like_fused_clip_grad_norm_(backend_device):
    model, twin = tiny_model(backend_device), tiny_model(backend_device)
    backward(model, 0, scale=10.0)
    backward(twin, 0, scale=10.0)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink]) as monitor:
        total = monitor.step(max_norm=0.5)
    expected_total = gradstats.fused_clip_grad_norm_(twin.parameters(), 0.5)
    assert torch.equal(total, expected_total)
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(ours.grad, theirs.grad)
    [record] = sink.records
    assert record.clip_coef == pytest.approx(0.5 / (expected_total.item() + 1e-6), rel=1e-6)
    assert record.total_norm == pytest.approx(expected_total.item(), rel=1e-6)


def test_writes_exactly_the_steps_asked_for(tmp_path):
    model = tiny_model()
    jsonl, table = tmp_path / "g.jsonl", tmp_path / "g.csv"
    with gradstats.GradMonitor(model, log_every=3, hist_every=4,
                               sinks=[f"jsonl:{jsonl}", f"csv:{table}"]) as monitor:
        for step in range(10):
            model.zero_grad()
            backward(model, step)
            monitor.step()
            assert monitor.steps == step + 1
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 3, 4, 6, 8, 9]
    assert [line["step"] for line in lines if "hist" in line] == [0, 4, 8]
    rows = table.read_text().splitlines()
    assert rows[0] == "step,scope,name,norm,nonfinite,clip_coef"
    total_rows = [row.split(",") for row in rows[1:] if row.split(",")[1] == "total"]
    assert [int(row[0]) for row in total_rows] == [0, 3, 4, 6, 8, 9]


def test_writes_nothing_on_other_steps():
    model = tiny_model()
    sink = ListSink()
    with gradstats.GradMonitor(model, log_every=5, sinks=[sink]) as monitor:
        for step in range(5):
            backward(model, step)
            monitor.step()
            assert [r.step for r in sink.records] == [0]


def test_nan_alarm_names_the_parameter_and_the_step():
    model = tiny_model()
    monitor = gradstats.GradMonitor(model, sinks=[ListSink()])
    with pytest.warns(RuntimeWarning) as caught:
        for step in range(7):
            model.zero_grad()
            backward(model, step)
            if step in (2, 3, 5):  # two runs of non-finite steps: 2-3 and 5
                poison(model, "1.1.weight", float("inf") if step == 3 else float("nan"))
            monitor.step()
        monitor.close()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "first appeared at step 2 in '1.1.weight' (1 NaN/Inf)" in messages[0]
    assert "at step 5 in '1.1.weight'" in messages[1]


def test_nonfinite_counts_are_logged_per_parameter_and_module():
    model = tiny_model()
    sink = ListSink()
    backward(model, 0)
    poison(model, "0.bias")
    poison(model, "2.weight", float("-inf"))
    with gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="ignore", hist_every=1) as m:
        m.step()
    [record] = sink.records
    assert record.nonfinite == {"0.bias": 1, "2.weight": 1}
    assert record.module_nonfinite == {"0": 1, "2": 1}
    assert math.isnan(record.norms["0.bias"]) and math.isnan(record.total_norm)
    assert math.isinf(record.norms["2.weight"])
    # Histograms hold the finite values only.
    assert sum(record.hist["0.bias"]) == 7 - 1
    assert record.to_json()["norms"]["0.bias"] == "nan"
    assert record.to_json()["norms"]["2.weight"] == "inf"


def test_raise_names_the_parameter_and_leaves_gradients_untouched():
    model = tiny_model()
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="raise")
    backward(model, 0)
    monitor.step(max_norm=1e-3)
    model.zero_grad()
    backward(model, 1, scale=100.0)
    poison(model, "2.bias")
    before = [q.grad.clone() for q in model.parameters()]
    with pytest.raises(RuntimeError, match=r"step 1 in '2.bias' \(1 NaN/Inf\)"):
        monitor.step(max_norm=1e-3)
    for grad, old in zip((q.grad for q in model.parameters()), before):
        torch.testing.assert_close(grad, old, equal_nan=True, rtol=0, atol=0)
    # Written before the error, the offending step too (its counts name the culprit).
    assert [r.step for r in sink.records] == [0, 1]
    assert sink.records[1].nonfinite == {"2.bias": 1} and sink.records[1].clip_coef is None
    monitor.close()


OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                                  weight_decay=0.1),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=0.1, foreach=True),
}


@pytest.mark.parametrize("attached", [False, True], ids=["optimizer-arg", "attach"])
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_skip_leaves_parameters_unchanged_through_the_optimizer_step(make_optimizer, attached):
    model = tiny_model()
    optimizer = make_optimizer(model.parameters())
    if attached:
        monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip")
        monitor.attach(optimizer, max_norm=1.0)
        take_step = optimizer.step
    else:
        monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip", optimizer=optimizer)

        def take_step():
            monitor.step(max_norm=1.0)
            optimizer.step()
    for step in range(4):
        optimizer.zero_grad()
        backward(model, step)
        if step == 2:
            poison(model, "1.1.weight")
        before = snapshot(model, optimizer)
        if step == 2:
            with pytest.warns(RuntimeWarning, match="step 2 .* update was skipped"):
                take_step()
                monitor.flush()
            assert_same(before, snapshot(model, optimizer))
            assert not hasattr(optimizer, "found_inf")
        else:
            take_step()
            assert not torch.equal(before[0][0], next(model.parameters()))
    assert monitor.steps == 4
    monitor.close()


def test_skip_with_grad_scaler_and_a_fused_optimizer_skips_once():
    """GradScaler hands the fused optimizer its own found_inf: combined with the monitor's,
    the flag must stay 1, or the fused kernel updates anyway and rewinds `step` twice."""
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip").attach(optimizer)
    for step in range(3):
        optimizer.zero_grad()
        scaler.scale(model(torch.ones(2, 5)).square().sum()).backward()
        if step == 1:
            poison(model, "0.weight", float("inf"))  # an overflow both of them see
        scaler.unscale_(optimizer)
        before = snapshot(model, optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a scaler overflow is routine: no alarm
            scaler.step(optimizer)
            monitor.flush()
        scaler.update()
        if step == 1:
            assert_same(before, snapshot(model, optimizer))
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert optimizer.state[next(model.parameters())]["step"].item() == 2
    monitor.close()


def test_failed_optimizer_step_does_not_bring_back_stale_gradients():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip", optimizer=optimizer)

    def fail(*args):
        raise KeyError("boom")

    backward(model, 0)
    poison(model, "0.weight")
    with pytest.warns(RuntimeWarning):
        monitor.step()
    handle = optimizer.register_step_pre_hook(fail)
    with pytest.raises(KeyError):
        optimizer.step()  # gradients hidden, then the step fails before it un-hides them
    handle.remove()
    backward(model, 1)  # fresh, finite gradients; this step is not monitored
    fresh = [q.grad.clone() for q in model.parameters()]
    optimizer.step()
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert all(torch.equal(q.grad, g) for q, g in zip(model.parameters(), fresh))
    monitor.close()


def test_records_that_land_late_are_written_in_order_and_at_close(monkeypatch):
    """As on a GPU: copies not yet landed wait for a later step or for close()."""
    from gradstats import record_queue as monitor_module

    landed = {"now": False}
    monkeypatch.setattr(monitor_module, "copy_fence",
                        lambda device: (lambda: landed["now"], lambda: None))
    model = tiny_model()
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model.zero_grad()
            backward(model, step)
            if step == 1:
                poison(model, "2.bias")
            monitor.step()
        assert sink.records == [] and caught == []  # nothing waited for the copies
        landed["now"] = True
        monitor.step()  # the next step writes what has landed, oldest first
    assert [r.step for r in sink.records] == [0, 1, 2, 3]
    assert ["step 1 in '2.bias'" in str(w.message) for w in caught] == [True]
    monitor.close()


def test_at_most_max_in_flight_records_wait(monkeypatch):
    from gradstats import record_queue as monitor_module

    monkeypatch.setattr(monitor_module, "MAX_IN_FLIGHT", 2)
    monkeypatch.setattr(monitor_module, "copy_fence",
                        lambda device: (lambda: False, lambda: None))
    model = tiny_model()
    sink = ListSink()
    backward(model, 0)
    with gradstats.GradMonitor(model, sinks=[sink]) as monitor:
        for _ in range(4):
            monitor.step()
        assert [r.step for r in sink.records] == [0, 1]  # the oldest were waited for
    assert [r.step for r in sink.records] == [0, 1, 2, 3]


def test_a_single_sink_spec_none_and_empty_list(tmp_path, monkeypatch):
    model = tiny_model()
    backward(model, 0)
    with gradstats.GradMonitor(model, sinks=f"jsonl:{tmp_path}/one.jsonl") as monitor:
        monitor.step()
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) == 1
    monkeypatch.chdir(tmp_path)
    for no_sinks in (None, []):
        with gradstats.GradMonitor(model, sinks=no_sinks) as monitor:
            monitor.step()
        assert monitor.sinks == [] and monitor.paths == []
    assert not (tmp_path / "runs").exists()


def test_sinks_of_a_wrong_type_is_a_clear_type_error():
    with pytest.raises(TypeError, match="sinks must be a sink spec .* got int"):
        gradstats.GradMonitor(tiny_model(), sinks=42)


def test_skip_needs_the_optimizer():
    model = tiny_model()
    backward(model, 0)
    with pytest.raises(RuntimeError, match="needs the optimizer"):
        gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip").step()


def test_callable_gets_every_nonfinite_step():
    model = tiny_model()
    calls = []
    monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite=lambda s, f: calls.append((s, f)))
    for step in range(4):
        model.zero_grad()
        backward(model, step)
        if step >= 2:
            poison(model, "0.weight")
        monitor.step()
    monitor.close()
    assert calls == [(2, {"0.weight": 1}), (3, {"0.weight": 1})]


def test_attach_monitors_only_optimizer_updates_under_gradient_accumulation():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink]).attach(optimizer, max_norm=0.5)
    expected = []
    for update in range(3):
        for micro in range(4):
            backward(model, 10 * update + micro)
        expected.append(expected_record(model, 2.0)["total"])
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()
    assert [r.step for r in sink.records] == [0, 1, 2]
    np.testing.assert_allclose([r.total_norm for r in sink.records], expected, rtol=1e-5)
    assert all(r.clip_coef == pytest.approx(min(1.0, 0.5 / (t + 1e-6)), rel=1e-6)
               for r, t in zip(sink.records, expected))
    optimizer.step()  # hooks removed by close(): no new step
    assert monitor.steps == 3


def test_grad_scaler_statistics_are_of_unscaled_gradients():
    model, twin = tiny_model(), tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink]).attach(optimizer)
    scaler.scale(model(torch.ones(2, 5)).square().sum()).backward()
    twin(torch.ones(2, 5)).square().sum().backward()
    scaler.step(optimizer)  # unscales, then optimizer.step() runs the monitor
    scaler.update()
    monitor.close()
    expected = expected_record(twin, 2.0)["total"]
    assert sink.records[0].total_norm == pytest.approx(expected, rel=1e-5)


def test_compiled_model_keeps_the_module_names():
    model = tiny_model()
    compiled = torch.compile(model, backend="eager")
    sink = ListSink()
    compiled(torch.ones(2, 5)).sum().backward()
    with gradstats.GradMonitor(compiled, sinks=[sink]) as monitor:
        monitor.step()
    assert list(sink.records[0].norms) == [name for name, _ in model.named_parameters()]


def test_parameters_without_gradients_are_left_out():
    model = tiny_model()
    sink = ListSink()
    model[2].weight.requires_grad_(False)
    backward(model, 0)
    with gradstats.GradMonitor(model, sinks=[sink]) as monitor:
        monitor.step()
    assert "2.weight" not in sink.records[0].norms and "2.bias" in sink.records[0].norms


def test_close_flushes_closes_sinks_and_is_final():
    model = tiny_model()
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink]) as monitor:
        backward(model, 0)
        monitor.step()
    assert sink.closed and len(sink.records) == 1
    monitor.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step()


@pytest.mark.parametrize("kwargs, error", [
    ({"log_every": 0}, "log_every must be a positive int"),
    ({"hist_every": -2}, "hist_every must be a positive int"),
    ({"hist_every": 0}, "hist_every must be a positive int"),
    ({"on_nonfinite": "explode"}, "on_nonfinite must be one of"),
    ({"sinks": ["parquet:x"]}, "unknown sink 'parquet:x'"),
    ({"sinks": ["tensorboard"]}, r"needs a folder: 'tensorboard:DIR'"),
    ({"sinks": ["jsonl+keep:x.jsonl"]}, r"'\+keep' is not a mode of 'jsonl'"),
    ({"sinks": ["logging+append"]}, r"'\+append' is not a mode of 'logging'"),
    ({"sinks": ["logging:x"]}, "takes no argument"),
    ({"sinks": [42]}, "a sink is a string"),
    ({"num_bins": 1}, "num_bins must be"),
    ({"optimizer": "sgd", "sinks": ["jsonl"]}, "optimizer must be a torch.optim.Optimizer"),
    ({"norm_type": "fro"}, "norm_type must be a number"),
])
def test_bad_arguments_are_named(kwargs, error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, TypeError), match=error):
        gradstats.GradMonitor(tiny_model(), **{"sinks": [], **kwargs})
    assert not (tmp_path / "runs").exists()  # raised before any sink made a file


def test_negative_max_norm_is_an_error_before_anything_changes():
    model = tiny_model()
    backward(model, 0)
    monitor = gradstats.GradMonitor(model, sinks=[])
    with pytest.raises(ValueError, match="max_norm must be a non-negative number"):
        monitor.step(max_norm=-1.0)
    assert monitor.steps == 0


@pytest.mark.parametrize("p", [2.0, 1.0, 0.5, 3.0, math.inf, 0.0, -1.0, -math.inf])
@pytest.mark.parametrize("norms", [[3.0, 4.0, 0.5], [0.0, 2.0], [1e-30, 1e30], [7.0]])
def test_module_norm_is_the_norm_of_its_parameters_norms(norms, p):
    expected = torch.linalg.vector_norm(torch.tensor(norms, dtype=torch.float64), p).item()
    assert combine_norms(norms, p) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(combine_norms(norms + [math.nan], p))


def test_nan_that_comes_and_goes_keeps_the_warning_registry_bounded(caplog):
    from gradstats import nonfinite

    model = tiny_model()
    monitor = gradstats.GradMonitor(model, sinks=[])
    registry_sizes = []
    with warnings.catch_warnings(record=True) as caught, \
            caplog.at_level(logging.WARNING, logger="gradstats"):
        warnings.simplefilter("default")
        for step in range(40):
            model.zero_grad()
            backward(model, step)
            if step % 2:
                poison(model, "0.bias")
            monitor.step()
            registry_sizes.append(len(getattr(sys.modules[__name__], "__warningregistry__", {})))
    monitor.close()
    assert max(registry_sizes) <= nonfinite.MAX_WARNINGS + 1  # + the registry's version key
    assert len(caught) == nonfinite.MAX_WARNINGS
    assert [w.message.step for w in caught] == [1, 3, 5, 7, 9]
    assert caught[0].message.found == {"0.bias": 1}
    assert "further NaN/Inf alarms of this monitor go to the 'gradstats' logger" in str(
        caught[-1].message)
    assert len(caplog.messages) == 20 - nonfinite.MAX_WARNINGS  # the rest: logged
    assert "first appeared at step 39 in '0.bias'" in caplog.messages[-1]
    assert caught[0].filename == __file__  # points at the user's monitor.step() line


def test_the_alarm_of_an_attached_monitor_points_at_the_optimizer_step_line():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradstats.GradMonitor(model, sinks=[]).attach(optimizer)
    backward(model, 0)
    poison(model, "0.bias")
    with pytest.warns(gradstats.NonFiniteGradientWarning) as caught:
        optimizer.step()
    assert caught[0].filename == __file__
    monitor.close()


def test_steps_from_several_threads_are_numbered_in_call_order():
    model = tiny_model()
    backward(model, 0)
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink])
    threads = [threading.Thread(target=lambda: [monitor.step() for _ in range(50)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monitor.close()
    assert [r.step for r in sink.records] == list(range(200))


def test_a_child_module_named_root_is_not_merged_with_the_root_parameters(caplog):
    model = torch.nn.Module()
    model.add_module("<root>", torch.nn.Linear(2, 1))
    model.register_parameter("evil\nname", torch.nn.Parameter(torch.ones(2)))
    loss = model.get_submodule("<root>")(torch.ones(1, 2)).sum()
    (loss + getattr(model, "evil\nname").sum() * float("nan")).backward()
    sink = ListSink()
    with caplog.at_level(logging.INFO, logger="gradstats"):
        with gradstats.GradMonitor(model, sinks=[sink, "logging"], on_nonfinite="ignore") as m:
            m.step()
    [record] = sink.records
    assert set(record.module_norms) == {"", "<root>"}
    assert record.module_norms["<root>"] == pytest.approx(math.sqrt(3))
    assert math.isnan(record.module_norms[""])
    assert record.scalars()["grad_norm/module/<root>"] == pytest.approx(math.sqrt(3))
    assert math.isnan(record.scalars()["grad_norm/root"])
    [line] = [m for m in caplog.messages if m.startswith("step 0")]
    assert "\n" not in line and line.endswith("NaN/Inf in evil\\nname")
    assert "largest: <root> nan, '<root>' 1.732" in line


def test_step_checks_every_gradient_before_clipping_any():
    """The monitor's clip takes the same checks as fused_clip_grad_norm_: an expanded
    gradient (elements sharing memory) raises before the first gradient is scaled."""
    first = torch.nn.Parameter(torch.ones(4))
    expanded = torch.nn.Parameter(torch.ones(4))
    first.grad = torch.full((4,), 10.0)
    expanded.grad = torch.full((1,), 10.0).expand(4)
    monitor = gradstats.GradMonitor([("first", first), ("expanded", expanded)], sinks=None)
    with pytest.raises(RuntimeError, match="'expanded' is expanded"):
        monitor.step(max_norm=1.0)
    assert torch.equal(first.grad, torch.full((4,), 10.0))


def test_sparse_gradients_with_a_composed_norm_type_name_the_parameter():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    monitor = gradstats.GradMonitor(embedding, norm_type=0, sinks=None)
    with pytest.raises(ValueError, match="sparse gradients need norm_type > 0.*'weight'"):
        monitor.step()


def test_without_sinks_no_record_is_built_and_alarms_still_name_the_parameter(monkeypatch):
    from gradstats import record_queue

    def no_records(*args):
        raise AssertionError("a record was built for no sink")
    monkeypatch.setattr(record_queue, "build_record", no_records)
    model = tiny_model()
    backward(model, 0)
    poison(model, "1.1.weight", math.inf)
    with gradstats.GradMonitor(model, sinks=None, hist_every=1) as monitor:
        with pytest.warns(gradstats.NonFiniteGradientWarning) as caught:
            monitor.step()
    assert caught[0].message.found == {"1.1.weight": 1}
