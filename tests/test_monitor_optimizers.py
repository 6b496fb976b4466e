"""GradMonitor at optimizer.step(): closures (Lightning, LBFGS), accelerate, GradScaler, skip."""
import gc
import math
import warnings
import weakref

import pytest
import torch
from monitor_helpers import ListSink, assert_same, backward, poison, snapshot, tiny_model

import gradstats

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam-foreach": lambda params: torch.optim.Adam(params, lr=0.1, foreach=True),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
}


def make_closure(model, optimizer, seed, nan_in=None, monitor=None, max_norm=None):
    """A closure as Lightning builds one: zero_grad, backward, then (for a callback in
    on_before_optimizer_step) monitor.step() on the fresh gradients."""

    def closure():
        optimizer.zero_grad()
        backward(model, seed)
        if nan_in is not None:
            poison(model, nan_in)
        if monitor is not None:
            monitor.step(max_norm)
        return torch.tensor(0.0)

    return closure


def closure_monitor(mode, model, optimizer, on_nonfinite, max_norm=None):
    """`attach`: the monitor runs itself after the closure; `inside`: the closure calls
    monitor.step(), with optimizer= given for "skip"."""
    sink = ListSink()
    if mode == "attach":
        monitor = gradstats.GradMonitor(model, sinks=[sink], on_nonfinite=on_nonfinite)
        monitor.attach(optimizer, max_norm=max_norm)
    else:
        monitor = gradstats.GradMonitor(model, sinks=[sink], on_nonfinite=on_nonfinite,
                                        optimizer=optimizer)
    return monitor, sink


MODES = ["attach", "inside"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_skip_with_a_closure_skips_the_very_update_with_nan_on_the_first_step(
        make_optimizer, mode):
    model = tiny_model()
    optimizer = make_optimizer(model.parameters())
    monitor, sink = closure_monitor(mode, model, optimizer, "skip")
    inside = monitor if mode == "inside" else None
    before = snapshot(model, optimizer)
    with pytest.warns(gradstats.NonFiniteGradientWarning, match="step 0 .* update was skipped"):
        optimizer.step(make_closure(model, optimizer, 0, nan_in="1.1.weight", monitor=inside))
        monitor.flush()
    assert_same(before, snapshot(model, optimizer))
    assert not hasattr(optimizer, "found_inf")
    assert torch.isnan(model[1][1].weight.grad).any()  # gradients handed back after the step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next, finite step: no advice, no error
        optimizer.step(make_closure(model, optimizer, 1, monitor=inside))
    assert not torch.equal(before[0][0], model[0].weight)
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert monitor.steps == 2 and [r.step for r in sink.records] == [0, 1]
    monitor.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("on_nonfinite", ["raise", "warn"])
def test_raise_and_warn_with_a_closure_name_the_first_step(mode, on_nonfinite):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor, _ = closure_monitor(mode, model, optimizer, on_nonfinite)
    inside = monitor if mode == "inside" else None
    before = snapshot(model, optimizer)
    expected = (pytest.raises(RuntimeError, match=r"step 0 in '0.bias'") if on_nonfinite == "raise"
                else pytest.warns(gradstats.NonFiniteGradientWarning,
                                  match="first appeared at step 0 in '0.bias'"))
    with expected:
        optimizer.step(make_closure(model, optimizer, 0, nan_in="0.bias", monitor=inside))
        monitor.flush()
    if on_nonfinite == "raise":  # stopped before the update
        assert_same(before, snapshot(model, optimizer))
    monitor.close()


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_attach_clips_the_gradients_the_closure_made(make_optimizer):
    model, twin = tiny_model(), tiny_model()
    optimizer = make_optimizer(model.parameters())
    twin_optimizer = make_optimizer(twin.parameters())
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink]).attach(optimizer, max_norm=0.1)
    for step in range(3):
        loss = optimizer.step(make_closure(model, optimizer, step))

        def twin_closure():
            twin_optimizer.zero_grad()
            backward(twin, step)
            gradstats.fused_clip_grad_norm_(twin.parameters(), 0.1)
            return torch.tensor(0.0)
        twin_optimizer.step(twin_closure)
        assert loss is not None and loss.item() == 0.0  # the closure's loss is returned
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(ours, theirs)
    assert [r.step for r in sink.records] == [0, 1, 2]
    assert all(r.clip_coef < 1.0 for r in sink.records)
    monitor.close()


def lbfgs_closure(model, optimizer, clip=None):
    def closure():
        optimizer.zero_grad()
        loss = model(torch.ones(3, 5)).square().sum()
        loss.backward()
        if clip is not None:
            gradstats.fused_clip_grad_norm_(model.parameters(), clip)
        return loss
    return closure


def test_lbfgs_attach_monitors_and_clips_every_closure_evaluation():
    model, twin = tiny_model(), tiny_model()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=4)
    twin_optimizer = torch.optim.LBFGS(twin.parameters(), max_iter=4)
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink]).attach(optimizer, max_norm=0.5)
    optimizer.step(lbfgs_closure(model, optimizer))
    twin_optimizer.step(lbfgs_closure(twin, twin_optimizer, clip=0.5))
    evaluations = optimizer.state[optimizer._params[0]]["func_evals"]
    assert evaluations > 1
    assert monitor.steps == evaluations and len(sink.records) == evaluations
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(ours, theirs)
    monitor.close()


@pytest.mark.parametrize("mode", MODES)
def test_lbfgs_with_skip_is_refused_before_anything_changes(mode):
    model = tiny_model()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=4)
    monitor, sink = closure_monitor(mode, model, optimizer, "skip")
    calls = []
    closure = lbfgs_closure(model, optimizer)
    before = snapshot(model, optimizer)
    with pytest.raises(RuntimeError, match="cannot skip an LBFGS step"):
        optimizer.step(lambda: calls.append(1) or closure())
    assert calls == [] and monitor.steps == 0
    assert_same(before, snapshot(model, optimizer))
    monitor.close()


@pytest.mark.filterwarnings("ignore::gradstats.NonFiniteGradientWarning")
def test_skip_refuses_a_second_closure_evaluation_of_an_unknown_optimizer():
    class TwiceSGD(torch.optim.SGD):
        def step(self, closure):
            closure()
            return super().step(closure)

    model = tiny_model()
    optimizer = TwiceSGD(model.parameters(), lr=0.1)
    monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip").attach(optimizer)
    with pytest.raises(RuntimeError, match="evaluates its closure more than once"):
        optimizer.step(make_closure(model, optimizer, 0, nan_in="0.weight"))
    # The gradients hidden to skip the first evaluation's update come back with the error.
    assert all(p.grad is not None for p in model.parameters())
    monitor.close()


def test_a_step_that_raises_leaves_no_skip_flag_on_a_fused_optimizer():
    """A skip armed for a step that raised before its end (here: another pre-hook) must not
    stay on the optimizer: a found_inf left there would skip every later update."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip").attach(optimizer)
    failures = [RuntimeError("a later pre-hook fails once")]

    def fail_once(*_):
        if failures:
            raise failures.pop()
    optimizer.register_step_pre_hook(fail_once)
    backward(model, 0)
    poison(model, "0.weight")
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="fails once"):
        warnings.simplefilter("ignore")
        optimizer.step()
    for seed in (1, 2):
        model.zero_grad()
        backward(model, seed)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        assert not any(torch.equal(old, p) for old, p in zip(before, model.parameters()))
    assert getattr(optimizer, "found_inf", None) is None
    monitor.close()


def test_a_monitor_dropped_without_close_takes_its_hooks_off_the_optimizer():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip", optimizer=optimizer)
        gc.collect()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_skip_decided_before_a_closure_step_is_an_error_not_a_stale_skip():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip", optimizer=optimizer)
    backward(model, 0)
    monitor.step()  # judged these gradients; the closure below makes new ones
    with pytest.raises(RuntimeError, match="call monitor.step\\(\\) inside the closure"):
        optimizer.step(make_closure(model, optimizer, 1))
    optimizer.step(make_closure(model, optimizer, 1, monitor=monitor))  # the flag is gone
    monitor.close()


@pytest.mark.parametrize("inner", [False, True], ids=["accelerated", "inner"])
def test_attach_works_with_an_accelerate_prepared_optimizer(inner):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_model()
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="skip")
    monitor.attach(optimizer.optimizer if inner else optimizer, max_norm=0.5)
    for step in range(3):
        backward(model, step)
        if step == 1:
            poison(model, "0.weight")
        before = snapshot(model, optimizer.optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradstats.NonFiniteGradientWarning)
            optimizer.step()  # AcceleratedOptimizer.step calls optimizer.step(None)
        if step == 1:
            assert_same(before, snapshot(model, optimizer.optimizer))
        optimizer.zero_grad()
    assert monitor.steps == 3 and [r.step for r in sink.records] == [0, 1, 2]
    assert all(torch.isfinite(q).all() for q in model.parameters())
    monitor.close()


def test_grad_scaler_step_with_a_positional_none_closure():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink]).attach(optimizer, max_norm=1.0)
    scaler.scale(model(torch.ones(2, 5)).square().sum()).backward()
    scaler.step(optimizer, None)  # as accelerate does: scaler.step(optimizer, closure)
    scaler.update()
    assert monitor.steps == 1 and sink.records[0].clip_coef is not None
    monitor.close()


def test_attach_on_a_closed_monitor_is_refused():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradstats.GradMonitor(model, sinks=[])
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"):
        monitor.attach(optimizer)
    backward(model, 0)
    optimizer.step()  # not hooked: the optimizer works as before


def test_lightning_callback_in_on_before_optimizer_step_skips_that_very_update():
    """Lightning's automatic optimization steps with a closure that runs backward and then
    on_before_optimizer_step; a callback calling monitor.step() there skips that update."""
    lightning = pytest.importorskip("lightning")

    class Model(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch, index):
            return self.net(batch).square().sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class MonitorCallback(lightning.Callback):
        def on_fit_start(self, trainer, module):
            self.monitor = gradstats.GradMonitor(module, sinks=[], on_nonfinite="skip",
                                                 optimizer=trainer.optimizers[0])
            self.weights = []

        def on_before_optimizer_step(self, trainer, module, optimizer):
            if trainer.global_step == 1:
                module.net.weight.grad[0, 0] = float("nan")
            self.monitor.step(max_norm=1.0)

        def on_train_batch_end(self, trainer, module, *args):
            self.weights.append(module.net.weight.detach().clone())

    callback = MonitorCallback()
    trainer = lightning.Trainer(max_steps=3, callbacks=[callback], accelerator="cpu",
                                logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    data = torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=1)
    with pytest.warns(gradstats.NonFiniteGradientWarning, match="step 1 in 'net.weight'"):
        trainer.fit(Model(), data)
    callback.monitor.close()
    first, skipped, last = callback.weights
    assert torch.equal(first, skipped) and not torch.equal(skipped, last)
    assert torch.isfinite(last).all() and callback.monitor.steps == 3


@pytest.mark.parametrize("with_closure", [False, True], ids=["no-closure", "closure"])
def test_a_subclass_calling_super_step_is_one_monitored_and_skipped_update(with_closure):
    """torch runs the step hooks again for the parent's step inside a subclass's: the monitor
    must run once per update, and the inner call must not undo the outer call's skip."""
    torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)  # torch wraps SGD.step now

    class CustomSGD(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    model = tiny_model()
    optimizer = CustomSGD(model.parameters(), lr=0.1, momentum=0.9)
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink], on_nonfinite="skip").attach(optimizer)
    before = snapshot(model, optimizer)
    closure = make_closure(model, optimizer, 0, nan_in="0.weight")
    with pytest.warns(gradstats.NonFiniteGradientWarning, match="step 0 .* update was skipped"):
        if with_closure:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
    assert_same(before, snapshot(model, optimizer))
    model.zero_grad()
    backward(model, 1)
    optimizer.step()
    assert not torch.equal(before[0][0], model[0].weight)
    assert monitor.steps == 2 and [r.step for r in sink.records] == [0, 1]
    monitor.close()


def test_a_step_that_raised_keeps_none_of_the_callers_locals_alive():
    """The nested-step check must hold no frame: after a failed step (an OOM, say) the
    user's locals (a batch, activations) go as soon as the user lets them go."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradstats.GradMonitor(model, sinks=[]).attach(optimizer)
    optimizer.register_step_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("OOM")))
    probe = []

    def train_step():
        activations = torch.empty(1000)
        probe.append(weakref.ref(activations))
        backward(model, 0)
        optimizer.step()

    with pytest.raises(RuntimeError, match="OOM"):
        train_step()
    gc.collect()
    assert probe[0]() is None
    monitor.close()


def test_a_failed_step_does_not_overwrite_the_next_steps_grad_scaler_flag():
    """The skip restored after a step that raised must not write that step's GradScaler
    flag over the one GradScaler set for the next step (a clean update would be skipped)."""
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    monitor = gradstats.GradMonitor(model, sinks=[], on_nonfinite="skip").attach(optimizer)
    failures = [RuntimeError("transient")]

    def fail_once(*_):
        if failures:
            raise failures.pop()
    optimizer.register_step_pre_hook(fail_once)
    x = torch.randn(4, 5)
    scaler.scale(model(x).sum() * math.inf).backward()  # overflow: GradScaler's flag is 1
    scaler.unscale_(optimizer)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="transient"):
        warnings.simplefilter("ignore")
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    scaler.scale(model(x).square().sum()).backward()  # finite
    scaler.unscale_(optimizer)
    before = model[0].weight.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(before, model[0].weight)
    monitor.close()
