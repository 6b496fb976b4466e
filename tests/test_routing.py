"""``route_torch_clipping``: torch's clip functions run gradstats' drop-ins, for torch's own
callers (timm, Lightning, Fabric, accelerate), with torch's results; undo restores torch."""
import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch

import gradstats
from gradstats import clip as gs_clip
from gradstats import routing

NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
TORCH = {name: getattr(torch.nn.utils, name) for name in NAMES}  # torch's, before any routing
GRADSTATS = {"clip_grad_norm_": "fused_clip_grad_norm_", "clip_grad_value_": "clip_grad_value_",
             "get_total_norm": "get_total_norm", "clip_grads_with_norm_": "clip_grads_with_norm_"}


@pytest.fixture(autouse=True)
def _torch_restored():
    yield
    leaked = routing._active is not None
    if leaked:  # leave later tests a clean torch even when this one failed mid-way
        routing._active.uninstall()
        routing._active = None
    assert not leaked, "a test left torch's clipping routed"
    assert all(getattr(torch.nn.utils, name) is TORCH[name] for name in NAMES)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach gradstats' drop-ins (the routing looks them up in
    gradstats.clip at call time)."""
    counts = {name: 0 for name in NAMES}
    for torch_name, gs_name in GRADSTATS.items():
        real = getattr(gs_clip, gs_name)

        def spy(*args, _real=real, _name=torch_name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(gs_clip, gs_name, spy)
    return counts


def _params(scale=1.0, nan=False):
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (0,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).float()) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape) * scale
    params.append(torch.nn.Parameter(torch.randn(2)))  # no grad: skipped by both
    if nan:
        params[1].grad[2] = math.nan
    return params


def _clone(params):
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for clone, p in zip(clones, params):
        clone.grad = None if p.grad is None else p.grad.clone()
    return clones


def _grads(params):
    return [p.grad for p in params if p.grad is not None]


def test_routing_replaces_every_name_in_both_modules_and_undo_restores_torch():
    before = {(m, n): getattr(m, n) for m in MODULES for n in NAMES if hasattr(m, n)}
    deprecated = torch.nn.utils.clip_grad.clip_grad_norm
    handle = gradstats.route_torch_clipping()
    assert handle.active
    for (module, name), original in before.items():
        assert getattr(module, name) is not original, f"{module.__name__}.{name} not routed"
    # One routed function per name, whichever module the client reads it from.
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is torch.nn.utils.clip_grad_norm_
    handle.undo()
    assert not handle.active
    for (module, name), original in before.items():
        assert getattr(module, name) is original
    assert torch.nn.utils.clip_grad.clip_grad_norm is deprecated


def test_routing_twice_does_not_stack_and_undo_in_any_order_restores_torch(calls):
    first = gradstats.route_torch_clipping()
    routed = torch.nn.utils.clip_grad_norm_
    second = gradstats.route_torch_clipping()
    assert torch.nn.utils.clip_grad_norm_ is routed  # not a router around a router
    params = _params(scale=10.0)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert calls["clip_grad_norm_"] == 1
    first.undo()  # out of order: the second handle still holds the routing
    assert torch.nn.utils.clip_grad_norm_ is routed
    first.undo()  # a handle undoes once
    assert torch.nn.utils.clip_grad_norm_ is routed
    second.undo()
    assert torch.nn.utils.clip_grad_norm_ is TORCH["clip_grad_norm_"]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert calls["clip_grad_norm_"] == 1


def test_context_manager_undoes_on_exception():
    with pytest.raises(KeyError):
        with gradstats.route_torch_clipping() as handle:
            assert torch.nn.utils.get_total_norm is not TORCH["get_total_norm"]
            raise KeyError("boom")
    assert not handle.active
    assert torch.nn.utils.get_total_norm is TORCH["get_total_norm"]


def test_undo_leaves_a_later_patch_in_place():
    handle = gradstats.route_torch_clipping()

    def someone_elses(*args, **kwargs):
        return None
    torch.nn.utils.clip_grad_value_ = someone_elses
    try:
        with pytest.warns(RuntimeWarning, match="clip_grad_value_ was replaced"):
            handle.undo()
        assert torch.nn.utils.clip_grad_value_ is someone_elses
        assert torch.nn.utils.clip_grad_norm_ is TORCH["clip_grad_norm_"]
    finally:
        torch.nn.utils.clip_grad_value_ = TORCH["clip_grad_value_"]


CLIP_NORM_CALLS = {
    "positional": lambda f, ps: f(ps, 1.0),
    "generator": lambda f, ps: f((p for p in ps), 1.0),
    "keywords": lambda f, ps: f(parameters=ps, max_norm=0.5, norm_type=1.0),
    # torch's inf-norm fails on an empty tensor (gradstats' does not): leave it out
    "inf-norm": lambda f, ps: f([p for p in ps if p.numel()], 0.25, norm_type=math.inf),
    "foreach-true": lambda f, ps: f(ps, 1.0, foreach=True),
    "foreach-false": lambda f, ps: f(ps, 1.0, 2.0, False, False),
    "error-if-nonfinite": lambda f, ps: f(ps, 1.0, error_if_nonfinite=True),
    "no-clip-needed": lambda f, ps: f(ps, 1e6),
    "one-tensor": lambda f, ps: f(ps[0], 1.0),
    "deprecated": lambda f, ps: torch.nn.utils.clip_grad.clip_grad_norm(ps, 1.0),
}


@pytest.mark.parametrize("call", CLIP_NORM_CALLS.values(), ids=CLIP_NORM_CALLS.keys())
def test_clip_grad_norm_matches_torch(call, calls):
    params = _params(scale=3.0)
    expected_params = _clone(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias
        expected = call(TORCH["clip_grad_norm_"], expected_params)
        with gradstats.route_torch_clipping():
            total = call(torch.nn.utils.clip_grad_norm_, params)
    assert calls["clip_grad_norm_"] == 1
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    _assert_grads_close(params, expected_params)


def _assert_grads_close(params, expected_params):
    for got, want in zip(_grads(params), _grads(expected_params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_get_total_norm_and_clip_grads_with_norm_match_torch(calls):
    params = _params(scale=3.0)
    expected_params = _clone(params)
    want_norm = TORCH["get_total_norm"]((g for g in _grads(expected_params)), norm_type=3.0)
    TORCH["clip_grads_with_norm_"](expected_params, 2.0, want_norm)
    with gradstats.route_torch_clipping():
        norm = torch.nn.utils.get_total_norm((g for g in _grads(params)), norm_type=3.0)
        torch.nn.utils.clip_grads_with_norm_((p for p in params), max_norm=2.0, total_norm=norm)
    assert (calls["get_total_norm"], calls["clip_grads_with_norm_"]) == (1, 1)
    torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)
    _assert_grads_close(params, expected_params)


def test_clip_grad_value_matches_torch_bit_for_bit(calls):
    params = _params(scale=3.0)
    expected_params = _clone(params)
    TORCH["clip_grad_value_"](expected_params, 0.5)
    with gradstats.route_torch_clipping():
        torch.nn.utils.clip_grad_value_((p for p in params), clip_value=0.5, foreach=True)
    assert calls["clip_grad_value_"] == 1
    for got, want in zip(_grads(params), _grads(expected_params)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_error_if_nonfinite_raises_naming_the_parameter_and_modifies_nothing():
    params = _params(nan=True)
    before = [g.clone() for g in _grads(params)]
    with pytest.raises(RuntimeError, match="non-finite"):  # torch raises too
        TORCH["clip_grad_norm_"](_clone(params), 1.0, error_if_nonfinite=True)
    with gradstats.route_torch_clipping():
        with pytest.raises(RuntimeError, match=r"parameter 1 \(1 NaN/Inf\)"):
            torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for got, want in zip(_grads(params), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_empty_generator_warns_as_torch_at_the_callers_line():
    with gradstats.route_torch_clipping():
        with pytest.warns(UserWarning, match="empty generator") as record:
            total = torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    assert record[0].filename == __file__
    assert float(total) == 0.0


def test_dtensor_gradients_run_gradstats_except_clip_grad_value_(calls):
    """DTensor gradients reach gradstats (a DTensor total, as torch's); clip_grad_value_,
    which gradstats serves for plain tensors only, and mixed lists go to torch's."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        params = []
        for n, placement in ((4, Replicate()), (3, Shard(0))):
            param = torch.nn.Parameter(distribute_tensor(torch.ones(n), mesh, [placement]))
            param.grad = distribute_tensor(torch.full((n,), 2.0), mesh, [placement])
            params.append(param)
        with gradstats.route_torch_clipping():
            total = torch.nn.utils.clip_grad_norm_((p for p in params), 1.0)
            value = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grads_with_norm_(params, 0.5, value)
            torch.nn.utils.clip_grad_value_(params, 0.1)
            with pytest.raises(Exception):  # torch's own refusal of the mixed list
                torch.nn.utils.get_total_norm([params[0].grad, torch.ones(2)])
    finally:
        dist.destroy_process_group()
    assert calls["clip_grad_norm_"] == calls["clip_grads_with_norm_"] == 1
    assert calls["get_total_norm"] == 1 and calls["clip_grad_value_"] == 0
    assert isinstance(total, DTensor) and isinstance(value, DTensor)
    torch.testing.assert_close(total.full_tensor(), torch.tensor(math.sqrt(28.0)))
    torch.testing.assert_close(value.full_tensor(), torch.tensor(1.0), rtol=1e-6, atol=0)
    # clipped to norm 1, then to 0.5 (by the DTensor total 1), then clamped at 0.1
    expected = min(0.1, 0.5 * 2 / math.sqrt(28.0) / (1.0 + 1e-6))
    torch.testing.assert_close(params[0].grad.full_tensor(), torch.full((4,), expected))


def test_other_tensor_subclasses_go_to_torchs_function(calls):
    class Marked(torch.Tensor):
        pass

    params = _params()[:3]
    for param in params:
        param.grad = param.grad.as_subclass(Marked)
    expected_params = _clone(params)
    expected = TORCH["clip_grad_norm_"](expected_params, 0.1)
    with gradstats.route_torch_clipping():
        total = torch.nn.utils.clip_grad_norm_(params, 0.1)
        torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grad_value_(params, 0.01)
    assert all(count == 0 for count in calls.values()), calls
    torch.testing.assert_close(total, expected)
    assert all(type(p.grad) is Marked for p in params)


# -- torch's callers ------------------------------------------------------------------------

def _load_timm_utils():
    """timm's own ``utils/clip_grad.py``, ``agc.py`` and ``cuda.py``, executed under a
    synthetic ``timm`` package: ``import timm`` needs torchvision, which CPU torch lacks."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (make test installs it with --no-deps)")
    root = list(spec.submodule_search_locations)[0]
    saved = {name: sys.modules.get(name) for name in ("timm", "timm.utils")}
    package, utils = types.ModuleType("timm"), types.ModuleType("timm.utils")
    package.__path__, utils.__path__ = [root], [f"{root}/utils"]
    sys.modules.update({"timm": package, "timm.utils": utils})
    loaded = {}
    try:
        for name in ("agc", "clip_grad", "cuda"):  # import order of their own imports
            full = f"timm.utils.{name}"
            module_spec = importlib.util.spec_from_file_location(full, f"{root}/utils/{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[full] = module
            module_spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name in ("agc", "clip_grad", "cuda"):
            sys.modules.pop(f"timm.utils.{name}", None)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return loaded


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _timm_steps(timm_utils, mode, value):
    """Three steps of timm's train_one_epoch update: NativeScaler(loss, optimizer,
    clip_grad, clip_mode, parameters), as timm/train.py calls it."""
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = timm_utils["cuda"].NativeScaler(device="cpu")
    data = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1)) * 5
    for batch in data:
        loss = model(batch).pow(2).sum()
        optimizer.zero_grad()
        scaler(loss, optimizer, clip_grad=value, clip_mode=mode,
               parameters=model.parameters())  # a generator, as timm passes it
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode, value, routed_name", [
    ("norm", 0.5, "clip_grad_norm_"), ("value", 0.05, "clip_grad_value_"), ("agc", 0.01, None)])
def test_timm_native_scaler_clips_through_gradstats(mode, value, routed_name, calls):
    timm_utils = _load_timm_utils()
    expected = _timm_steps(timm_utils, mode, value)
    with gradstats.route_torch_clipping():
        weights = _timm_steps(timm_utils, mode, value)
    if routed_name is None:  # adaptive clipping has its own code: nothing to route
        assert sum(calls.values()) == 0
    else:
        assert calls[routed_name] == 3
    for got, want in zip(weights, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(weights[0], _tiny_model()[0].weight.detach())  # it trained


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # Lightning's internals
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.parametrize("algorithm, clip_val, routed_name", [
    ("norm", 0.05, "clip_grad_norm_"), ("value", 0.001, "clip_grad_value_")])
def test_lightning_gradient_clip_val_clips_through_gradstats(algorithm, clip_val, routed_name,
                                                            calls, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    seen = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _tiny_model()

        def training_step(self, batch, batch_idx):
            return self.net(batch).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            # after the closure: the gradients as Lightning's clip left them
            seen.append([p.grad.clone() for p in self.parameters()])

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                         gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    data = torch.utils.data.DataLoader(torch.randn(12, 6) * 5, batch_size=4)
    with gradstats.route_torch_clipping():
        trainer.fit(Module(), data)
    assert calls[routed_name] == 3
    for grads in seen:
        if algorithm == "norm":
            norm = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
            assert norm <= clip_val * (1 + 1e-5)
        else:
            assert max(g.abs().max() for g in grads) <= clip_val


def test_accelerate_clip_grad_norm_runs_gradstats(calls):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = _tiny_model()
    model(torch.randn(4, 6) * 5).pow(2).sum().backward()
    expected_params = _clone(list(model.parameters()))
    expected = TORCH["clip_grad_norm_"](expected_params, 0.1)
    with gradstats.route_torch_clipping():
        total = accelerator.clip_grad_norm_(model.parameters(), 0.1)
    # accelerate < 1.16 calls clip_grad_norm_; later ones get_total_norm per device mesh,
    # then clip_grads_with_norm_ (their DTensor-aware clip): both routes reach gradstats.
    whole = calls["clip_grad_norm_"] == 1
    in_two_steps = calls["get_total_norm"] >= 1 and calls["clip_grads_with_norm_"] == 1
    assert whole != in_two_steps, calls
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    for got, want in zip(_grads(model.parameters()), _grads(expected_params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_fabric_clip_gradients_runs_gradstats_and_names_nonfinite_parameters(calls):
    fabric_module = pytest.importorskip("lightning.fabric")
    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    module = _tiny_model()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
    fabric.backward(model(torch.randn(4, 6) * 5).pow(2).sum())
    with gradstats.route_torch_clipping():
        total = fabric.clip_gradients(model, optimizer, max_norm=0.1)
        grads = [p.grad for p in model.parameters()]
        clipped = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        grads[2][0, 0] = math.nan
        # Fabric passes error_if_nonfinite=True: gradstats' error names the parameter.
        with pytest.raises(RuntimeError, match=r"parameter 2 \(1 NaN/Inf\)"):
            fabric.clip_gradients(model, optimizer, max_norm=0.1)
        fabric.clip_gradients(model, optimizer, clip_val=0.01)
    assert calls["clip_grad_norm_"] == 2 and calls["clip_grad_value_"] == 1
    assert float(total) > 0.1
    torch.testing.assert_close(clipped, torch.tensor(0.1), rtol=1e-4, atol=0)
    assert grads[0].abs().max() <= 0.01
