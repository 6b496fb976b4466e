"""``GradStatsCallback`` against the real Hugging Face Trainer (CPU, a 2-layer GPT-2 built
from a config, 4 optimizer steps): one record per update at the Trainer's step, values
against the gradients at that moment and against the Trainer's own ``grad_norm``, the
scalars in ``log_history`` and in TensorBoard's event files, ``max_norm`` in place of the
Trainer's clip, NaN handling, and ``GradMonitor.attach`` on the Trainer's optimizer."""
import glob
import math
import re

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradstats  # noqa: E402
from gradstats import GradMonitor  # noqa: E402
from gradstats.integrations.huggingface import GradStatsCallback  # noqa: E402

MAX_STEPS = 4


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=16, length=16):
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Capture(TrainerCallback):
    """The independent reference: gradients and weights where this callback sits in the
    list, before the optimizer step, and the weights and gradients after it."""

    def __init__(self):
        self.steps, self.grads, self.before, self.after = [], [], [], []
        self.grads_after = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(state.global_step)
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None})
        self.before.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.after.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.grads_after.append([p.grad.clone() for p in model.parameters() if p.grad is not None])


class ListSink:
    def __init__(self, clock=lambda: None):
        self.records, self.clock, self.written_at = [], clock, []

    def write(self, record):
        self.records.append(record)
        self.written_at.append(self.clock())


def _trainer(tmp_path, callbacks=(), **arguments):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    defaults = dict(output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=2,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                    disable_tqdm=True, max_grad_norm=0, learning_rate=1e-2)
    args = TrainingArguments(**{**defaults, **arguments})
    return Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=TokenData(),
                   callbacks=list(callbacks))


def _norm(tensors):
    return float(torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors])))


def _step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_record_per_update_at_the_trainers_step_with_reference_norms(tmp_path, accumulation,
                                                                         landing):
    capture = Capture()  # runs after the gradstats callback, which add_to puts first
    sink = ListSink(clock=lambda: len(capture.steps))
    trainer = _trainer(tmp_path, [capture], gradient_accumulation_steps=accumulation)
    GradStatsCallback(sinks=[sink]).add_to(trainer)
    trainer.train()
    assert capture.steps == [0, 1, 2, 3]  # once per update, not per micro-batch
    # written in on_pre_optimizer_step, or when on_log waits for them (after the update)
    assert sink.written_at == ([0, 1, 2, 3] if landing == "land-at-once" else [1, 2, 3, 4])
    assert [r.step for r in sink.records] == [1, 2, 3, 4]  # as the Trainer counts updates
    logs = _step_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for record, grads, log in zip(sink.records, capture.grads, logs):
        assert record.total_norm == pytest.approx(_norm(grads.values()), rel=1e-5)
        mlp = [grads["transformer.h.1.mlp.c_fc.weight"], grads["transformer.h.1.mlp.c_fc.bias"]]
        assert record.module_norms["transformer.h.1.mlp.c_fc"] == pytest.approx(_norm(mlp),
                                                                                rel=1e-5)
        # in the Trainer's logs, beside its own grad_norm (torch's, from the same gradients)
        assert log["grad_norm/total"] == record.total_norm
        assert log["grad_norm/total"] == pytest.approx(log["grad_norm"], rel=1e-5)
        assert log["grad_norm/module/transformer.h.1.mlp.c_fc"] == pytest.approx(_norm(mlp),
                                                                                 rel=1e-5)
        assert log["grad_nonfinite/total"] == 0
    # the final summary log of the same step does not repeat them
    assert "grad_norm/total" not in trainer.state.log_history[-1]


def test_scalars_reach_tensorboard_through_report_to_and_max_norm_replaces_the_trainers_clip(
        tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    max_norm = 0.5
    after = Capture()  # runs after the gradstats callback: sees the clipped gradients
    trainer = _trainer(tmp_path, [after], report_to=["tensorboard"])  # to output_dir/runs/
    GradStatsCallback(max_norm=max_norm).add_to(trainer)
    trainer.train()
    logs = _step_logs(trainer)
    for log, grads in zip(logs, after.grads):
        # The Trainer did not clip (max_grad_norm=0): its grad_norm is the norm before.
        assert log["grad_norm"] > max_norm
        assert log["grad_norm/total"] == pytest.approx(log["grad_norm"], rel=1e-5)
        assert log["grad_norm/clip_coef"] == pytest.approx(max_norm / (log["grad_norm"] + 1e-6),
                                                           rel=1e-5)
        assert _norm(grads.values()) == pytest.approx(max_norm, rel=1e-5)
    (event_file,) = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    events = EventAccumulator(event_file)
    events.Reload()
    for key in ["grad_norm/total", "grad_norm/clip_coef", "grad_norm/module/transformer.wte"]:
        scalars = events.Scalars(f"train/{key}")  # the Trainer's TensorBoard prefix
        assert [s.step for s in scalars] == [1, 2, 3, 4]
        assert [s.value for s in scalars] == pytest.approx([log[key] for log in logs], rel=1e-6)


def test_max_norm_with_the_trainers_clip_warns(tmp_path):
    trainer = _trainer(tmp_path, max_grad_norm=1.0, max_steps=1)
    GradStatsCallback(max_norm=0.5).add_to(trainer)
    with pytest.warns(UserWarning, match="clipped twice"):
        trainer.train()


def test_max_grad_norm_none_is_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path, max_grad_norm=None, max_steps=1)
    GradStatsCallback(max_norm=0.5).add_to(trainer)
    with pytest.raises(ValueError, match="max_grad_norm=0 turns its clipping off"):
        trainer.train()


def _nan_at_update(trainer, update):
    """A NaN in one gradient (``transformer.h.0.mlp.c_fc.bias``) on update ``update``."""
    bias = trainer.model.transformer.h[0].mlp.c_fc.bias
    bias.register_hook(lambda g: g * math.nan if trainer.state.global_step == update else g)


def test_nonfinite_raise_stops_before_the_optimizer_step(tmp_path):
    capture = Capture()
    trainer = _trainer(tmp_path, [capture])
    GradStatsCallback(on_nonfinite="raise").add_to(trainer)
    _nan_at_update(trainer, 1)
    with pytest.raises(RuntimeError, match=r"step 2 in .*'transformer.h.0.mlp.c_fc.bias' \(128 "):
        trainer.train()
    assert capture.steps == [0]  # the capture callback runs after gradstats': not reached
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), capture.after[0][name])


def test_with_routing_the_trainers_norm_call_no_longer_spreads_the_nan(tmp_path):
    """With max_grad_norm=0 the Trainer still measures its grad_norm through
    clip_grad_norm_(max_norm=inf), which in torch multiplies every gradient by NaN once one
    is NaN; routed to gradstats it changes nothing, so the alarm names the one parameter."""
    trainer = _trainer(tmp_path)
    GradStatsCallback(on_nonfinite="raise").add_to(trainer)
    _nan_at_update(trainer, 1)
    with gradstats.route_torch_clipping():
        with pytest.raises(RuntimeError) as raised:
            trainer.train()
    assert re.search(r"step 2 in 'transformer.h.0.mlp.c_fc.bias' \(128 NaN/Inf\); nothing",
                     str(raised.value))


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "adamw"])
def test_nonfinite_skip_leaves_the_weights_of_that_update_bit_identical(tmp_path, fused):
    capture = Capture()
    trainer = _trainer(tmp_path, [capture], optim="adamw_torch_fused" if fused else "adamw_torch")
    GradStatsCallback(on_nonfinite="skip").add_to(trainer)
    _nan_at_update(trainer, 1)
    with pytest.warns(RuntimeWarning, match="step 2 .* its optimizer update was skipped"):
        trainer.train()
    assert capture.steps == [0, 1, 2, 3]
    for name, weight in capture.before[1].items():
        assert torch.equal(capture.after[1][name], weight)  # the NaN update: no change at all
        assert not torch.equal(capture.after[0][name], capture.before[0][name])
        assert not torch.equal(capture.after[2][name], capture.before[2][name])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class AttachMonitor(TrainerCallback):
    """``GradMonitor(model).attach(optimizer)`` on the optimizer the Trainer creates: the
    kwargs carry accelerate's ``AcceleratedOptimizer``; its ``.optimizer`` is the torch one,
    whose ``step(None)`` it calls."""

    def __init__(self, sink, unwrap=True):
        self.sink, self.unwrap, self.monitor = sink, unwrap, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        target = optimizer.optimizer if self.unwrap else optimizer
        self.monitor = GradMonitor(model, sinks=[self.sink]).attach(target, max_norm=0.5)

    def on_train_end(self, args, state, control, **kwargs):
        self.monitor.close()


def test_monitor_attached_to_the_trainers_optimizer_steps_once_per_update(tmp_path):
    sink, capture = ListSink(), Capture()
    trainer = _trainer(tmp_path, [AttachMonitor(sink), capture], gradient_accumulation_steps=2)
    trainer.train()
    assert [r.step for r in sink.records] == [0, 1, 2, 3]
    logs = _step_logs(trainer)
    for record, log, grads, clipped in zip(sink.records, logs, capture.grads,
                                           capture.grads_after):
        # before the optimizer step, after on_pre_optimizer_step: the Trainer's grad_norm
        assert record.total_norm == pytest.approx(log["grad_norm"], rel=1e-5)
        assert record.total_norm == pytest.approx(_norm(grads.values()), rel=1e-5)
        assert record.clip_coef == pytest.approx(0.5 / (record.total_norm + 1e-6), rel=1e-5)
        assert _norm(clipped) == pytest.approx(0.5, rel=1e-5)  # clipped before the update


def test_monitor_attached_to_the_accelerated_optimizer_itself(tmp_path):
    sink = ListSink()
    _trainer(tmp_path, [AttachMonitor(sink, unwrap=False)], max_steps=2).train()
    assert [r.step for r in sink.records] == [0, 1]


def test_log_every_defaults_to_the_trainers_logging_steps(tmp_path):
    sink = ListSink()
    trainer = _trainer(tmp_path, logging_steps=2)
    GradStatsCallback(sinks=[sink]).add_to(trainer)
    trainer.train()
    assert [r.step for r in sink.records] == [2, 4]
    logs = _step_logs(trainer)
    assert [h["step"] for h in logs] == [2, 4]
    assert [h["grad_norm/total"] for h in logs] == [r.total_norm for r in sink.records]


def test_added_after_the_report_to_callbacks_warns_and_still_fills_log_history(tmp_path):
    trainer = _trainer(tmp_path, [GradStatsCallback(report_modules=False)], max_steps=2,
                       report_to=["tensorboard"])
    with pytest.warns(UserWarning, match=r"add_to\(trainer\).*\(tensorboard\)"):
        trainer.train()
    logs = _step_logs(trainer)
    assert [h["grad_norm/total"] for h in logs] == pytest.approx([h["grad_norm"] for h in logs],
                                                                 rel=1e-5)
    assert not any(k.startswith("grad_norm/module/") for k in logs[0])
