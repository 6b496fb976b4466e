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


class NanLinear(nn.Linear):
    """A Linear whose output is NaN while ``bad`` is set."""

    bad = True

    def forward(self, x):
        y = super().forward(x)
        return y * math.nan if self.bad else y


class SharedTwice(nn.Module):
    """shared -> mid -> shared -> out: the module called twice runs first and last."""

    def __init__(self, mid):
        super().__init__()
        self.shared, self.mid, self.out = nn.Linear(4, 4), mid, nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.shared(self.mid(self.shared(x))))


def one_step(model, x=None, **kwargs):
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="ignore",
                               track_activations=True, **kwargs) as monitor:
        model((torch.randn(8, 4) if x is None else x)).sum().backward()
        monitor.step()
    return sink.records[-1].activations


def test_forward_origin_follows_calls_of_a_module_called_twice():
    torch.manual_seed(0)
    # shared's first call is clean; mid makes the NaN; shared's second call carries it.
    activations = one_step(SharedTwice(NanLinear(4, 4)))
    assert activations.nonfinite_origin == {"module": "mid", "phase": "forward", "step": 0}


def test_backward_origin_follows_calls_of_a_module_called_twice():
    torch.manual_seed(0)
    model = SharedTwice(NanInBackward())
    activations = one_step(model)
    # Backward: out, shared (2nd call, clean), mid makes NaN for what feeds it: shared's
    # first call. In call order, the first NaN dL/dh is shared's (first call's output).
    assert activations.modules["mid"].grad_nonfinite == 0
    assert activations.nonfinite_origin == {"module": "shared", "phase": "backward",
                                            "step": 0}


class ChainWithBadBackward(nn.Module):
    """shared -> m2 -> bad (NaN in backward) -> shared -> m4: shared's second call is the
    first dL/dh computed after out's, and clean; m2's is the first NaN one."""

    def __init__(self):
        super().__init__()
        self.shared, self.m2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.bad, self.m4 = NanInBackward(), nn.Linear(4, 1)

    def forward(self, x):
        return self.m4(self.shared(self.bad(self.m2(self.shared(x)))))


def test_backward_origin_is_not_taken_from_a_shared_modules_first_backward_call():
    torch.manual_seed(0)
    activations = one_step(ChainWithBadBackward())
    assert activations.backward_order[:2] == ["m4", "shared"]
    assert activations.nonfinite_origin == {"module": "m2", "phase": "backward", "step": 0}


def test_origin_follows_calls_past_the_pending_limit():
    from gradstats.activations import MAX_PENDING_CALLS

    torch.manual_seed(0)
    model = nn.ModuleDict({"cell": nn.Linear(4, 4), "pre": NanLinear(4, 4)})
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="ignore",
                               track_activations=True) as monitor:
        h = torch.randn(2, 4)
        for t in range(MAX_PENDING_CALLS + 10):  # the cell's calls get folded
            if t == 30:
                h = model["pre"](h)  # NaN born here, between the cell's calls
            h = model["cell"](h)
        h.sum().backward()
        monitor.step()
    activations = sink.records[0].activations
    assert activations.nonfinite_origin == {"module": "pre", "phase": "forward", "step": 0}
    assert activations.modules["cell"].output_nonfinite == (MAX_PENDING_CALLS + 10 - 30) * 8


class DictOut(nn.Module):
    def forward(self, x):
        return {"out": torch.log(x - 10), "skip": x}


class TupleSecond(nn.Module):
    def forward(self, x):
        return x * 2.0, torch.log(x - 10)


class Consumes(nn.Module):
    def __init__(self, inner, key):
        super().__init__()
        self.a, self.inner, self.c, self.key = nn.Linear(4, 4), inner, nn.Linear(4, 1), key

    def forward(self, x):
        return self.c(self.inner(self.a(x))[self.key])


@pytest.mark.parametrize("inner, key", [(DictOut(), "out"), (TupleSecond(), 1)],
                         ids=["dict", "tuple-second"])
def test_nan_in_any_output_tensor_names_its_module(inner, key):
    torch.manual_seed(0)
    activations = one_step(Consumes(inner, key))
    assert activations.nonfinite_origin == {"module": "inner", "phase": "forward", "step": 0}
    assert activations.modules["inner"].output_nonfinite > 0


def test_output_norm_covers_every_tensor_of_a_dict_output():
    class TwoTensors(nn.Module):
        def forward(self, x):
            return {"a": x * 2.0, "b": (x + 1.0, torch.arange(3))}  # ints are not figures

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.two = nn.Linear(4, 4), TwoTensors()

        def forward(self, x):
            out = self.two(self.lin(x))
            return out["a"].sum() + out["b"][0].square().sum()

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(8, 4)
    activations = one_step(model, x)
    with torch.no_grad():
        h = model.lin.double()(x.double())
    figures = activations.modules["two"]
    expected = math.sqrt((2 * h).square().sum().item() + (h + 1).square().sum().item())
    assert figures.output_norm == pytest.approx(expected, rel=1e-5)
    # dL/d(2h) = 1 everywhere, dL/d(h + 1) = 2 (h + 1): both gradients in one norm.
    grad = math.sqrt(h.numel() + (2 * (h + 1)).square().sum().item())
    assert figures.grad_norm == pytest.approx(grad, rel=1e-5)


def test_gradient_made_nonfinite_by_the_loss_is_said_to_come_from_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1, bias=False))
    nn.init.zeros_(model[2].weight)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="ignore",
                               track_activations=True) as monitor:
        torch.sqrt(model(torch.randn(8, 4))).sum().backward()  # d sqrt(y)/dy at 0: Inf
        monitor.step()
        diagnosis = gradstats.diagnose(monitor)
    origin = sink.records[0].activations.nonfinite_origin
    assert origin == {"module": "2", "phase": "backward", "step": 0, "from_loss": True}
    assert any("'2'" in f and "the loss is non-finite" in f for f in diagnosis.findings)


def test_hooks_follow_a_model_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    old = model[1]
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], track_activations=True) as monitor:
        model[1] = nn.Linear(4, 4)
        model.append(nn.Linear(1, 1))
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            monitor.step()
        # The step that saw the change re-hooked: the next forward is tracked in full.
        assert list(sink.records[1].activations.modules) == ["0", "1", "2", "3"]
        assert len(old._forward_hooks) == 0 and len(model[1]._forward_hooks) == 1
        del model[3]
        model.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        monitor.step()
    assert all(len(m._forward_hooks) == 0 for m in model)


def test_nonfinite_forward_off_the_log_grid_is_written_and_diagnosed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), NanLinear(4, 4), nn.Linear(4, 1))
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], log_every=5, on_nonfinite="ignore",
                               track_activations=True) as monitor:
        for step in range(10):
            model[1].bad = step == 2
            model.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            monitor.step()
        diagnosis = gradstats.diagnose(monitor)
    assert [r.step for r in sink.records] == [0, 2, 5]
    assert sink.records[1].activations.nonfinite_origin == {
        "module": "1", "phase": "forward", "step": 2}
    assert sink.records[1].nonfinite and sink.records[1].hist is None
    assert diagnosis.nonfinite_origin["step"] == 2
    assert diagnosis.history[0].nonfinite_steps == [2]


def test_raise_and_warning_name_where_the_nan_was_born():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), NanLinear(4, 4), nn.Linear(4, 1))
    with gradstats.GradMonitor(model, sinks=[], on_nonfinite="raise",
                               track_activations=True) as monitor:
        model(torch.randn(8, 4)).sum().backward()
        with pytest.raises(RuntimeError, match=r"born in module '1' \(forward\)"):
            monitor.step()
    with gradstats.GradMonitor(model, sinks=[], on_nonfinite="warn",
                               track_activations=True) as monitor:
        model(torch.randn(8, 4)).sum().backward()
        with pytest.warns(gradstats.NonFiniteGradientWarning,
                          match=r"born in module '1' \(forward\)") as caught:
            monitor.step()
            monitor.flush()
    assert caught[0].message.origin["module"] == "1"
