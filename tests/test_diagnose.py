"""gradstats.diagnose: the verdicts and the fitted gamma on nets whose gradient profile is
known in closed form (deep linear nets with orthogonal layers scaled by gamma), the textbook
cases (deep sigmoid MLP, pre-LayerNorm residual stack), and each kind of finding."""
import math

import pytest
import torch
from monitor_helpers import ListSink
from torch import nn

import gradstats
from gradstats.diagnose import STACK_FACTOR, role_of, underflow_fractions


def deep_linear(gamma, depth=30, width=64, bias=True):
    """Orthogonal layers scaled by gamma: ||dL/dh_(l-1)|| = gamma ||dL/dh_l|| exactly."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layer = nn.Linear(width, width, bias=bias)
        nn.init.orthogonal_(layer.weight)
        with torch.no_grad():
            layer.weight.mul_(gamma)
            if bias:
                layer.bias.zero_()
        layers.append(layer)
    return nn.Sequential(*layers)


def sigmoid_mlp(depth=10, width=32):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class PreNormBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class PreNormStack(nn.Module):
    def __init__(self, depth=12, width=32):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(PreNormBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def train(model, width, steps=3, track_activations=False, sinks=None, lr=0.0, **kwargs):
    """A few SGD steps under a monitor; its diagnosis."""
    sink = ListSink()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with gradstats.GradMonitor(model, sinks=[sink] + (sinks or []), on_nonfinite="ignore",
                               track_activations=track_activations, **kwargs) as monitor:
        for step in range(steps):
            x = torch.randn(16, width, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            output = model(x)
            target = x.sum(1, keepdim=True).sin().expand_as(output)
            nn.functional.mse_loss(output, target).backward()
            monitor.step()
            optimizer.step()
        diagnosis = gradstats.diagnose(monitor)
    return diagnosis, sink.records


@pytest.mark.parametrize("gamma", [0.9, 1.0, 1.1])
def test_gamma_fitted_from_tracked_activations_within_one_percent(gamma):
    diagnosis, _ = train(deep_linear(gamma), 64, track_activations=True)
    assert diagnosis.gamma_source == "activation gradients" and diagnosis.caveat is None
    assert diagnosis.gamma == pytest.approx(gamma, rel=0.01)
    assert diagnosis.fit.depth == 30


@pytest.mark.parametrize("gamma, verdict", [(0.8, "vanishing"), (1.0, "healthy"),
                                            (1.25, "exploding")])
def test_deep_linear_verdicts(gamma, verdict):
    diagnosis, _ = train(deep_linear(gamma), 64, track_activations=True)
    assert diagnosis.verdict == verdict
    assert [w.verdict for w in diagnosis.history] == [verdict]
    if verdict != "healthy":
        finding = next(f for f in diagnosis.findings if f.startswith(verdict))
        assert "'0'" in finding  # the input-side layer is named
        fix = "initialisation" if verdict == "vanishing" else "clipping"
        assert fix in finding


def test_weight_gradients_hide_gamma_and_the_result_says_so():
    # The trap: without biases or tracked activations, ||dL/dW_l|| is flat.
    diagnosis, records = train(deep_linear(0.9, bias=False), 64)
    norms = records[-1].norms
    assert norms["0.weight"] / norms["29.weight"] == pytest.approx(1.0, rel=1e-3)
    assert diagnosis.gamma_source == "weight gradients"
    assert diagnosis.gamma == pytest.approx(1.0, rel=1e-3)
    assert "can hide gamma" in diagnosis.caveat


def test_deep_sigmoid_mlp_is_vanishing_from_parameter_gradients_alone():
    diagnosis, records = train(sigmoid_mlp(), 32)
    assert records[-1].activations is None
    assert diagnosis.verdict == "vanishing"
    assert diagnosis.gamma_source == "bias gradients"
    assert diagnosis.fit.stack_factor < 1 / STACK_FACTOR


@pytest.mark.parametrize("track", [False, True], ids=["parameters", "activations"])
def test_pre_layernorm_residual_stack_is_healthy(track):
    diagnosis, _ = train(PreNormStack(), 32, lr=0.01, track_activations=track)
    assert diagnosis.verdict == "healthy"
    assert diagnosis.gamma_source == ("activation gradients" if track else "bias gradients")
    assert 1 / STACK_FACTOR < diagnosis.fit.stack_factor < STACK_FACTOR
    assert not any(f.startswith(("vanishing", "exploding")) for f in diagnosis.findings)


def test_nan_gradient_is_nonfinite_and_names_the_parameter():
    model = sigmoid_mlp(depth=3, width=8)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="ignore") as monitor:
        for step in range(3):
            model.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            if step == 2:
                model[2].weight.grad[0, 1] = math.nan
            monitor.step()
        diagnosis = gradstats.diagnose(monitor)
    assert diagnosis.verdict == "nonfinite"
    assert diagnosis.history[-1].nonfinite_steps == [2]
    assert any("'2.weight'" in f and "non-finite" in f for f in diagnosis.findings)


def test_log_monitor_and_records_give_the_same_diagnosis(tmp_path):
    path = tmp_path / "g.jsonl"
    from_monitor, records = train(deep_linear(0.8, depth=12, width=16), 16, steps=4,
                                  track_activations=True, sinks=[f"jsonl:{path}"])
    from_log = gradstats.diagnose(path)
    from_records = gradstats.diagnose(records)
    assert from_log.verdict == from_monitor.verdict == from_records.verdict == "vanishing"
    assert from_log.gamma == pytest.approx(from_monitor.gamma, rel=1e-9)
    assert from_log.findings == from_monitor.findings


def test_grad_stats_source_is_diagnosed_from_one_step():
    model = deep_linear(0.7, depth=10, width=16)
    model(torch.randn(8, 16)).square().sum().backward()
    diagnosis = gradstats.diagnose(gradstats.grad_stats(model))
    assert diagnosis.verdict == "vanishing" and diagnosis.gamma_source == "bias gradients"
    assert diagnosis.gamma == pytest.approx(0.7, rel=1e-3)


def test_history_has_one_entry_per_window_and_the_verdict_is_the_last():
    model = sigmoid_mlp(depth=3, width=8)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="ignore") as monitor:
        for step in range(7):
            model.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            if step == 1:
                model[0].bias.grad[0] = math.inf
            monitor.step()
    diagnosis = gradstats.diagnose(sink.records, window=3)
    assert [(w.first_step, w.last_step) for w in diagnosis.history] == [(0, 0), (1, 3), (4, 6)]
    assert [w.nonfinite_steps for w in diagnosis.history] == [[], [1], []]
    assert diagnosis.history[1].verdict == "nonfinite"
    assert diagnosis.verdict != "nonfinite"
    assert any("(none in the last window)" in f for f in diagnosis.findings)


def test_norm_spike_is_found_at_its_step():
    model = PreNormStack(depth=2, width=8)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink]) as monitor:
        for step in range(12):
            model.zero_grad()
            scale = 1000.0 if step == 9 else 1.0
            (model(torch.randn(4, 8)).sum() * scale).backward()
            monitor.step()
    diagnosis = gradstats.diagnose(sink.records)
    spikes = [f for f in diagnosis.findings if f.startswith("total-norm spikes")]
    assert len(spikes) == 1 and "at step 9:" in spikes[0] and "learning rate" in spikes[0]


def test_dead_and_missing_gradients_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 1))
    unused = nn.Linear(4, 4)
    model.add_module("unused", unused)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU unit dead: nothing reaches layer 0
    sink = ListSink()
    with gradstats.GradMonitor(nn.ModuleDict({"net": model[:4], "unused": unused}),
                               sinks=[sink], hist_every=1) as monitor:
        model[:4](torch.randn(8, 4)).sum().backward()
        monitor.step()
        diagnosis = gradstats.diagnose(monitor)
    text = "\n".join(diagnosis.findings)
    assert "all-zero gradients" in text and "'net.0.weight'" in text
    assert "no gradient" in text and "'unused.weight'" in text


def test_saturated_tanh_layers_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    diagnosis, _ = train(model, 16, track_activations=True)
    finding = next(f for f in diagnosis.findings if f.startswith("saturated activations"))
    assert "'1'" in finding and "Xavier" in finding


def float64_fraction_below(values, exponent):
    nonzero = values[values != 0].double().abs()
    return (nonzero < 2.0 ** exponent).double().mean().item()


def test_underflow_fractions_match_the_values():
    generator = torch.Generator().manual_seed(0)
    values = torch.exp2(torch.empty(4000).uniform_(-34, 20, generator=generator))
    values[:100] = 0.0
    param = torch.zeros_like(values, requires_grad=True)
    param.grad = values.clone()
    sink = ListSink()
    with gradstats.GradMonitor([("p", param)], sinks=[sink], hist_every=1) as monitor:
        monitor.step()
    record = sink.records[0]
    fractions = underflow_fractions(record)
    # Surely 0 in fp16: below 2^-25 (the binade above rounds either way).
    assert fractions["fp16_zero"] == pytest.approx(float64_fraction_below(values, -25))
    assert fractions["fp16_subnormal"] == pytest.approx(float64_fraction_below(values, -14))
    assert fractions["fp16_overflow"] == pytest.approx(
        1 - float64_fraction_below(values, 16))
    # Nothing in the first column (below 2^-39), so the histogram tells: no bf16 zero.
    assert fractions["bf16_zero"] == 0.0
    diagnosis = gradstats.diagnose([record])
    text = "\n".join(diagnosis.findings)
    assert "fp16 underflow" in text and "'p'" in text and "GradScaler" in text
    assert "fp16 overflow" in text


def test_role_replaces_layer_indices():
    assert role_of("blocks.3.mlp.fc1") == "blocks.*.mlp.fc1"
    assert role_of("12") == "*"
    assert role_of("layer2.0.conv1") == "layer2.*.conv1"


def test_bad_sources_are_named():
    with pytest.raises(TypeError, match="needs a GradMonitor, a GradStats"):
        gradstats.diagnose(42)
    with pytest.raises(ValueError, match="window must be a positive int"):
        gradstats.diagnose([], window=0)
    with pytest.raises(ValueError, match="no records"):
        gradstats.diagnose([])
    with gradstats.GradMonitor(nn.Linear(2, 2), sinks=None) as monitor:
        with pytest.raises(ValueError, match="keeps no records"):
            gradstats.diagnose(monitor)


def test_monitor_keeps_histograms_only_in_its_latest_histogram_record():
    model = sigmoid_mlp(depth=3, width=8)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], hist_every=2) as monitor:
        for _ in range(5):
            model.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            monitor.step()
        kept = monitor.recent_records
    assert [r.step for r in kept] == [0, 1, 2, 3, 4]
    assert [r.hist is not None for r in kept] == [False, False, False, False, True]
    assert kept[4] is sink.records[4]
    assert all(r.hist is not None for r in sink.records[::2])  # the sinks' records intact
    assert kept[2].norms == sink.records[2].norms


def test_diagnosis_names_the_first_origin_not_the_latest():
    class LogWhenOn(nn.Module):
        on = False

        def forward(self, x):
            return torch.log(x) if self.on else x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), LogWhenOn(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    with gradstats.GradMonitor(model, sinks=[ListSink()], on_nonfinite="ignore",
                               track_activations=True) as monitor:
        for step in range(8):
            model[2].on = step == 3  # born in '2' at step 3; NaN weights from then on
            optimizer.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            monitor.step()
            optimizer.step()
        diagnosis = gradstats.diagnose(monitor)
    assert diagnosis.nonfinite_origin == {"module": "2", "phase": "forward", "step": 3}
    assert diagnosis.latest_nonfinite_origin == {"module": "0", "phase": "forward", "step": 7}
    born = next(f for f in diagnosis.findings if "born" in f)
    assert born.startswith("NaN/Inf first born at step 3 in module '2'")
    assert "the latest, at step 7, in module '0'" in born


def test_nonfinite_gradient_off_the_log_grid_is_written():
    model = sigmoid_mlp(depth=3, width=8)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], log_every=4, on_nonfinite="ignore") as m:
        for step in range(6):
            model.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            if step == 1:
                model[2].weight.grad[0, 1] = math.nan
            m.step()
        diagnosis = gradstats.diagnose(m)
    assert [r.step for r in sink.records] == [0, 1, 4]
    assert sink.records[1].nonfinite == {"2.weight": 1}
    assert diagnosis.history[-1].nonfinite_steps == [1]


def test_profile_finding_is_kept_when_the_last_window_has_nan():
    model = deep_linear(0.7, depth=10, width=16)
    sink = ListSink()
    with gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="ignore") as monitor:
        for step in range(4):
            model.zero_grad()
            model(torch.randn(8, 16)).square().sum().backward()
            if step == 3:
                model[5].weight.grad[0, 0] = math.inf
            monitor.step()
    diagnosis = gradstats.diagnose(sink.records)
    assert diagnosis.verdict == "nonfinite"
    assert any(f.startswith("vanishing gradients") for f in diagnosis.findings)


def one_histogram_record(values, **kwargs):
    param = torch.zeros(len(values), requires_grad=True)
    param.grad = torch.tensor(values)
    sink = ListSink()
    with gradstats.GradMonitor([("w", param)], sinks=[sink], hist_every=1, **kwargs) as m:
        m.step()
    return sink.records[0]


@pytest.mark.parametrize("layout", [dict(min_exp=-10), dict(num_bins=16)],
                         ids=["first-column-clamps-fp16-limits", "last-column-clamps-2^16"])
def test_limit_inside_a_clamped_column_is_no_finding(layout):
    record = one_histogram_record([1e-3] * 100, **layout)
    text = "\n".join(gradstats.diagnose([record]).findings)
    assert "fp16 underflow at" not in text and "fp16 overflow at" not in text
    assert "cannot tell with this histogram range" in text
    bounds = gradstats.diagnose([record]).underflow
    assert bounds["fp16_subnormal"] == (0.0, 1.0)  # the histogram cannot place 2^-14


def test_values_normal_in_bf16_give_no_bf16_finding():
    record = one_histogram_record([1e-13] * 100)  # 2^-43.2: bf16 is normal to 2^-126
    text = "\n".join(gradstats.diagnose([record]).findings)
    assert "bf16 underflow" not in text
    assert "fp16 underflow at step 0: 100.0%" in text  # fp16 loses them all: a fact


def test_fp16_zero_starts_half_a_subnormal_below_the_smallest():
    # 2^-24.5 rounds to fp16's smallest subnormal 2^-24, not to 0.
    assert torch.tensor(2 ** -24.5).half().item() == 2 ** -24
    fractions = underflow_fractions(one_histogram_record([2 ** -24.5] * 10 + [2 ** -26.5] * 30))
    assert fractions["fp16_zero"] == pytest.approx(0.75)
    assert fractions["fp16_subnormal"] == 1.0


def test_embedding_zero_rows_are_not_dead_units():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(500, 8)  # a name that does not say "embedding"
            self.embed_pos = nn.Embedding(64, 8)
            self.head = nn.Linear(8, 500)

        def forward(self, idx):
            return self.head(self.table(idx) + self.embed_pos(torch.arange(idx.shape[1])))

    torch.manual_seed(0)
    model = TinyLM()
    for track in (False, True):
        sink = ListSink()
        with gradstats.GradMonitor(model, sinks=[sink], hist_every=1,
                                   track_activations=track) as monitor:
            idx = torch.randint(0, 500, (2, 8))
            nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
            monitor.step()
            from_monitor = "\n".join(gradstats.diagnose(monitor).findings)
        assert "mostly exact-zero" not in from_monitor
        # From records alone: the class from tracked activations, else the name.
        from_records = "\n".join(gradstats.diagnose(sink.records).findings)
        assert ("'table.weight'" in from_records) == (not track)
        assert "'embed_pos.weight'" not in from_records
