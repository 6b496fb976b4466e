"""Activation tracking: per-module output and dL/dh norms, NaN/Inf counts and origin,
saturation; checked against float64 references computed by hand (retain_grad)."""
import math

import pytest
import torch
from monitor_helpers import ListSink
from torch import nn

import gradstats
from gradstats.activations import SATURATION_MARGIN, leaf_modules


def small_mlp(depth=3, width=8):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def run_steps(model, steps=1, width=8, sink=None, **kwargs):
    sink = sink or ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="ignore",
                               track_activations=True, **kwargs) as monitor:
        for step in range(steps):
            model.zero_grad()
            x = torch.randn(4, width, generator=torch.Generator().manual_seed(step))
            model(x).square().sum().backward()
            monitor.step()
    return sink.records


def test_norms_match_float64_outputs_and_their_gradients():
    model = small_mlp()
    record = run_steps(model)[0].activations
    # The reference: the same step in float64, every output's gradient kept.
    reference = small_mlp().double()
    outputs = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            outputs[name] = output
        return hook
    for name, module in leaf_modules(reference):
        module.register_forward_hook(keep(name))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).double()
    reference(x).square().sum().backward()
    assert list(record.modules) == [name for name, _ in leaf_modules(reference)]
    for name, figures in record.modules.items():
        assert figures.output_norm == pytest.approx(outputs[name].norm().item(), rel=1e-5)
        assert figures.grad_norm == pytest.approx(outputs[name].grad.norm().item(), rel=1e-5)
        assert figures.output_nonfinite == figures.grad_nonfinite == 0
    assert record.backward_order == list(reversed(record.modules))
    assert record.nonfinite_origin is None


def test_saturated_fraction_counts_outputs_within_the_margin_of_a_bound():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Tanh(), nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.tensor([[-10.0], [-0.5], [0.0], [0.5], [2.0], [3.0], [10.0], [0.1]])
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], track_activations=True) as monitor:
        model(x).sum().backward()
        monitor.step()
    figures = sink.records[0].activations.modules
    tanh_out = torch.tanh(x.double())
    sigmoid_out = torch.sigmoid(tanh_out)
    expected_tanh = (tanh_out.abs() >= 1 - SATURATION_MARGIN).double().mean().item()
    expected_sigmoid = ((sigmoid_out <= SATURATION_MARGIN)
                        | (sigmoid_out >= 1 - SATURATION_MARGIN)).double().mean().item()
    assert figures["1"].saturated == pytest.approx(expected_tanh) == 3 / 8  # -10, 3, 10
    assert figures["2"].saturated == pytest.approx(expected_sigmoid)
    assert figures["0"].saturated is None  # a Linear does not saturate


def test_module_called_twice_in_a_step_reports_the_norm_of_both_outputs():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    record = run_steps(model, width=4)[0].activations
    first = shared(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    second = shared(torch.tanh(first))
    expected = math.sqrt(first.norm().item() ** 2 + second.norm().item() ** 2)
    assert list(record.modules) == ["0", "1"]  # one leaf, registered once
    assert record.modules["0"].output_norm == pytest.approx(expected, rel=1e-5)


class DivideByZero(nn.Module):
    def forward(self, x):
        return x / torch.zeros_like(x)  # inf (and NaN where x == 0)


def test_forward_inf_names_the_module_that_produced_it():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(7)] + [DivideByZero()] + [
        nn.Linear(8, 8) for _ in range(4)]
    model = nn.Sequential(*layers)
    records = run_steps(model, steps=2)
    origin = records[1].activations.nonfinite_origin
    assert origin == {"module": "7", "phase": "forward", "step": 1}
    assert records[1].activations.modules["6"].output_nonfinite == 0
    assert records[1].activations.modules["7"].output_nonfinite == 4 * 8
    diagnosis = gradstats.diagnose(records)
    assert diagnosis.verdict == "nonfinite"
    assert any("'7'" in f and "forward output" in f for f in diagnosis.findings)


class NanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


class NanInBackward(nn.Module):
    def forward(self, x):
        return NanBackward.apply(x)


def test_backward_only_nan_names_the_first_module_in_backward_order():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(7)] + [NanInBackward()] + [
        nn.Linear(8, 8) for _ in range(4)]
    model = nn.Sequential(*layers)
    activations = run_steps(model)[0].activations
    # The forward is clean; the gradient w.r.t. module 6's output (module 7's input) is
    # the first NaN the backward pass makes.
    assert all(m.output_nonfinite == 0 for m in activations.modules.values())
    assert activations.nonfinite_origin == {"module": "6", "phase": "backward", "step": 0}
    assert activations.modules["7"].grad_nonfinite == 0
    assert activations.backward_order[:5] == ["11", "10", "9", "8", "7"]


def test_hooks_are_removed_on_close():
    model = small_mlp()
    before = [len(m._forward_hooks) for m in model.modules()]
    monitor = gradstats.GradMonitor(model, sinks=[ListSink()], track_activations=True)
    assert sum(len(m._forward_hooks) for m in model.modules()) == len(leaf_modules(model))
    out = model(torch.randn(2, 8))  # a graph with tensor hooks, backpropagated after close
    monitor.close()
    assert [len(m._forward_hooks) for m in model.modules()] == before
    out.sum().backward()  # the pending tensor hooks record nothing
    snapshot = monitor._activations.take()
    assert snapshot.backward_order == [] and len(snapshot.norms) == len(snapshot.forward_order)


def test_forward_without_gradients_is_not_recorded():
    model = small_mlp()
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], track_activations=True) as monitor:
        with torch.no_grad():
            model(torch.full((2, 8), 1e30))  # an evaluation pass: not this step's figures
        model(torch.randn(2, 8)).sum().backward()
        monitor.step()
    assert sink.records[0].activations.nonfinite_origin is None
    assert sink.records[0].activations.modules["0"].output_norm < 1e3


SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def test_hooks_never_read_a_tensor_back_to_the_host(monkeypatch):
    model = small_mlp()
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], track_activations=True) as monitor:
        with monkeypatch.context() as patched:
            def refuse(*args, **kwargs):
                raise AssertionError("a host read in a tracked forward/backward")
            for method in SYNCING_METHODS:
                patched.setattr(torch.Tensor, method, refuse)
            model(torch.randn(4, 8)).sum().backward()
        monitor.step()
    assert sink.records[0].activations.modules["0"].grad_norm > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hooks_do_not_synchronize_cuda():
    model = small_mlp().cuda()
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], track_activations=True) as monitor:
        x = torch.randn(4, 8, device="cuda")
        model(x).sum()  # warm-up: first-call allocations
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        monitor.step()
    assert sink.records[-1].activations.modules["0"].grad_norm > 0


def test_activations_round_trip_through_jsonl(tmp_path):
    path = tmp_path / "a.jsonl"
    model = small_mlp()
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink, f"jsonl:{path}"], track_activations=True,
                               on_nonfinite="ignore") as monitor:
        model(torch.randn(2, 8)).sum().backward()
        monitor.step()
        model(torch.full((2, 8), math.inf)).sum().backward()
        monitor.step()
    read = gradstats.read_jsonl(path)
    assert read[0].activations == sink.records[0].activations
    assert read[1].activations.nonfinite_origin == {"module": "0", "phase": "forward",
                                                    "step": 1}
    assert math.isnan(read[1].activations.modules["0"].output_norm)


def test_track_activations_needs_a_module():
    with pytest.raises(TypeError, match="track_activations=True needs the model"):
        gradstats.GradMonitor([torch.zeros(2, requires_grad=True)], sinks=[],
                              track_activations=True)


def test_module_called_more_than_the_pending_limit_folds_its_figures_exactly():
    from gradstats.activations import MAX_PENDING_CALLS

    torch.manual_seed(0)
    cell = nn.Linear(4, 4)
    calls = 2 * MAX_PENDING_CALLS + 3
    model = nn.ModuleDict({"cell": cell})
    x = torch.randn(2, 4)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], track_activations=True) as monitor:
        h = x
        for _ in range(calls):
            h = torch.tanh(cell(h))
        h.sum().backward()
        monitor.step()
    with torch.no_grad():
        h, squares = x.double(), 0.0
        for _ in range(calls):
            pre = cell.double()(h)
            squares += pre.square().sum().item()
            h = torch.tanh(pre)
    figures = sink.records[0].activations.modules["cell"]
    assert figures.output_norm == pytest.approx(math.sqrt(squares), rel=1e-5)
    assert figures.output_nonfinite == 0 and figures.grad_norm > 0
