"""``GradStatsCallback`` against Lightning's real Trainer (CPU, tiny module, a few steps):
records per optimizer step at the Trainer's step, values against gradients captured at the
same moment, clipping from the same pass, and NaN handling (warn / raise / skip)."""
import csv
import math

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from gradstats.integrations.lightning import GradStatsCallback  # noqa: E402

LR = 0.1
# Lightning's own notices about tiny runs and its internals, not about this integration.
LIGHTNING_NOISE = [pytest.mark.filterwarnings("ignore:.*LeafSpec"),
                   pytest.mark.filterwarnings("ignore:The number of training batches"),
                   pytest.mark.filterwarnings("ignore:.*does not have many workers")]
pytestmark = LIGHTNING_NOISE


class TinyModule(pl.LightningModule):
    """A tiny MLP; at batch ``nan_batch`` only ``net.2.bias`` gets a NaN gradient, so the
    other gradients show whether anything was clipped."""

    def __init__(self, nan_batch=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 3))
        self.nan_batch = nan_batch

    def training_step(self, batch, batch_idx):
        loss = self.net(batch).pow(2).mean()
        if batch_idx == self.nan_batch:
            loss = loss + self.net[2].bias.sum() * math.nan
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class Capture(pl.Callback):
    """The independent reference: gradients and weights as this hook sees them, the step,
    and the optimizer Lightning passes."""

    def __init__(self):
        self.steps, self.grads, self.weights, self.optimizers = [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(trainer.global_step)
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
        self.optimizers.append(optimizer)


class ListSink:
    def __init__(self, clock=lambda: None):
        self.records, self.closed, self.clock, self.written_at = [], False, clock, []

    def write(self, record):
        self.records.append(record)
        self.written_at.append(self.clock())

    def close(self):
        self.closed = True


def _data(n_batches):
    data = torch.randn(n_batches * 4, 6, generator=torch.Generator().manual_seed(1)) * 3
    return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(tmp_path, callbacks, data, max_steps, nan_batch=None, **trainer_kwargs):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps,
                         logger=CSVLogger(tmp_path), callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **trainer_kwargs)
    module = TinyModule(nan_batch)
    trainer.fit(module, data)
    return trainer, module


def _logged_rows(trainer):
    """metrics.csv rows that carry gradstats' scalars, as {column: float}."""
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("grad_norm/total")]
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


def _norm(tensors):
    return float(torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors])))


def test_one_record_per_optimizer_step_at_the_trainers_step_with_reference_norms(tmp_path,
                                                                                  landing):
    capture = Capture()
    sink = ListSink(clock=lambda: len(capture.steps))
    trainer, _ = _fit(tmp_path, [capture, GradStatsCallback(log_every=1, sinks=[sink])],
                      _data(6), max_steps=3, accumulate_grad_batches=2)
    assert capture.steps == [0, 1, 2]  # 6 batches, 2 per optimizer step
    # written at the step, or all at the end of training (before the loggers finalize)
    assert sink.written_at == ([1, 2, 3] if landing == "land-at-once" else [3, 3, 3])
    # Lightning passes the torch optimizer itself, the one whose step() runs the closure.
    assert all(opt is trainer.optimizers[0] for opt in capture.optimizers)
    assert isinstance(capture.optimizers[0], torch.optim.SGD)
    rows = _logged_rows(trainer)
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    assert [record.step for record in sink.records] == [0, 1, 2]
    assert sink.closed
    for row, grads in zip(rows, capture.grads):
        assert row["grad_norm/total"] == pytest.approx(_norm(grads.values()), rel=1e-6)
        first_layer = [grads["net.0.weight"], grads["net.0.bias"]]
        assert row["grad_norm/module/net.0"] == pytest.approx(_norm(first_layer), rel=1e-6)
        assert row["grad_nonfinite/total"] == 0
        assert "grad_norm/clip_coef" not in row  # no clipping asked for


def test_log_every_defaults_to_the_trainers_log_every_n_steps(tmp_path):
    trainer, _ = _fit(tmp_path, [GradStatsCallback()], _data(5), max_steps=5,
                      log_every_n_steps=2)
    assert [int(row["step"]) for row in _logged_rows(trainer)] == [0, 2, 4]


def test_max_norm_clips_in_the_same_pass_and_the_weights_follow(tmp_path):
    max_norm = 0.01
    before, after = Capture(), Capture()  # around the gradstats callback
    trainer, module = _fit(tmp_path, [before, GradStatsCallback(max_norm=max_norm, log_every=1),
                                      after], _data(3), max_steps=3)
    rows = _logged_rows(trainer)
    assert len(rows) == 3
    for row, grads_in, grads_out in zip(rows, before.grads, after.grads):
        norm = _norm(grads_in.values())
        assert norm > 10 * max_norm  # clipping had work to do
        assert row["grad_norm/total"] == pytest.approx(norm, rel=1e-6)  # the norm before
        assert row["grad_norm/clip_coef"] == pytest.approx(max_norm / (norm + 1e-6), rel=1e-6)
        assert _norm(grads_out.values()) == pytest.approx(max_norm, rel=1e-5)
    # SGD moved the weights by lr * the clipped gradients.
    final = dict(module.named_parameters())
    for step in range(3):
        next_weights = after.weights[step + 1] if step < 2 else final
        for name, weight in after.weights[step].items():
            expected = weight - LR * after.grads[step][name]
            torch.testing.assert_close(next_weights[name].detach(), expected)


def test_max_norm_with_gradient_clip_val_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="clipped twice"):
        _fit(tmp_path, [GradStatsCallback(max_norm=1.0)], _data(2), max_steps=2,
             gradient_clip_val=0.5)


# Under accumulate_grad_batches=a, optimizer step 1 sums batches a .. 2a - 1: the NaN goes
# into its first micro-batch.
ACCUMULATION = pytest.mark.parametrize("accumulation", [1, 2], ids=["accumulate-1", "accumulate-2"])


@ACCUMULATION
def test_nonfinite_warns_naming_the_step(tmp_path, accumulation):
    with pytest.warns(RuntimeWarning, match="first appeared at step 1 in 'net.2.bias' "):
        trainer, _ = _fit(tmp_path, [GradStatsCallback(log_every=1)], _data(3 * accumulation),
                          max_steps=3, nan_batch=accumulation,
                          accumulate_grad_batches=accumulation)
    nonfinite = {int(row["step"]): row["grad_nonfinite/total"] for row in _logged_rows(trainer)}
    assert (nonfinite[0], nonfinite[1]) == (0, 3)  # net.2.bias: 3 NaN (then the weights are)


@ACCUMULATION
def test_nonfinite_raise_stops_in_the_training_step_and_modifies_nothing(tmp_path, accumulation):
    capture, sink = Capture(), ListSink()
    callback = GradStatsCallback(on_nonfinite="raise", max_norm=0.01, sinks=[sink])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                         callbacks=[capture, callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accumulate_grad_batches=accumulation)
    module = TinyModule(nan_batch=accumulation)
    with pytest.raises(RuntimeError, match=r"non-finite gradients at step 1 in 'net.2.bias' \(3"):
        trainer.fit(module, _data(3 * accumulation))
    assert capture.steps == [0, 1]
    for name, param in module.named_parameters():  # not updated, not clipped
        assert torch.equal(param.detach(), capture.weights[1][name])
        torch.testing.assert_close(param.grad, capture.grads[1][name], rtol=0, atol=0,
                                   equal_nan=True)
    # the offending step was written before the error; the monitor was closed
    assert [record.step for record in sink.records] == [0, 1] and sink.closed
    assert callback.monitor is None


@ACCUMULATION
def test_nonfinite_skip_leaves_the_weights_of_that_step_unchanged(tmp_path, accumulation):
    capture = Capture()
    with pytest.warns(RuntimeWarning, match="step 1 .* its optimizer update was skipped"):
        _, module = _fit(tmp_path, [capture, GradStatsCallback(on_nonfinite="skip")],
                         _data(4 * accumulation), max_steps=4, nan_batch=accumulation,
                         accumulate_grad_batches=accumulation)
    assert capture.steps == [0, 1, 2, 3]
    for name, weight in capture.weights[2].items():
        assert torch.equal(weight, capture.weights[1][name])  # step 1: bit-identical
        assert not torch.equal(capture.weights[1][name], capture.weights[0][name])  # 0 moved
        assert not torch.equal(capture.weights[3][name], weight)  # and 2 moved again
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_only_global_rank_zero_writes_but_every_rank_clips(tmp_path, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    after, sink = Capture(), ListSink()
    trainer, _ = _fit(tmp_path, [GradStatsCallback(max_norm=0.01, log_every=1, sinks=[sink]),
                                 after], _data(2), max_steps=2)
    assert sink.records == [] and not sink.closed  # never opened on this rank
    for grads in after.grads:
        assert _norm(grads.values()) == pytest.approx(0.01, rel=1e-5)


def test_a_callable_on_nonfinite_gets_the_trainers_step(tmp_path):
    found = []
    _fit(tmp_path, [GradStatsCallback(on_nonfinite=lambda step, f: found.append((step, f)))],
         _data(3), max_steps=3, nan_batch=2)
    assert found == [(2, {"net.2.bias": 3})]
