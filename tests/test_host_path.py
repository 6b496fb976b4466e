"""host_path: the native walk (csrc/host_path.cpp) gives the gradients, names and route the
Python path gives, its plan keys hit exactly when the Python key would (same memory,
dtype, device, layout), and every entry point returns and raises the same on both paths.
The reference for results is torch.nn.utils, run on clones."""
import warnings

import pytest
import torch
from helpers import clone_params, make_params, with_grads

import gradstats
from gradstats import dispatch, native, worklist
from gradstats.host_path import gradients_and_route, plan_key
from gradstats.worklist import PlanKey

needs_native = pytest.mark.skipif(not native.host_path_available(),
                                  reason="gradstats._C (with the host path) is not built")
PATHS = [pytest.param("native", marks=needs_native), "python"]


@pytest.fixture(params=PATHS)
def host_path(request, monkeypatch):
    """Runs the test on the native host path and on the Python one."""
    if request.param == "python":
        monkeypatch.setattr(native, "host_path_available", lambda: False)
    return request.param


def on_path(path: str, fn):
    """``fn()`` with the host path ``path`` in force."""
    saved = native.host_path_available
    if path == "python":
        native.host_path_available = lambda: False
    try:
        return fn()
    finally:
        native.host_path_available = saved


def outcome(fn):
    """What ``fn()`` returned, or the type and text of what it raised."""
    try:
        return "returned", fn()
    except Exception as error:  # noqa: BLE001 - compared between the two paths
        return type(error).__name__, str(error)


# --- scenarios: parameters (and names) whose gradients exercise one thing each ---------

def _some_none(device):
    params = make_params([10, 300, 7, 5], torch.float32, device)
    params[1].grad = None
    params[3].grad = None
    return params


def _mixed_dtypes(device):
    return [p for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            for p in make_params([17, 3], dtype, device)]


def _non_contiguous(device):
    square = torch.randn(6, 6, device=device)
    strip = torch.randn(20, device=device)
    return with_grads([square.t(), strip[::2], torch.randn(8, device=device)])


def _views_of_one_buffer(device):
    buffer = torch.randn(30, device=device)
    return with_grads([buffer[:10], buffer[5:15], buffer[:10], buffer[20:]])


def _zero_elements(device):
    return with_grads([torch.empty(0, device=device), torch.randn(5, device=device),
                       torch.empty(0, 3, device=device)])


def _sparse(device):
    dense = torch.randn(4, 5, device=device)
    dense[dense.abs() < 0.8] = 0
    return with_grads([torch.randn(7, device=device), dense.to_sparse()])


def _complex(device):
    return with_grads([torch.randn(6, dtype=torch.complex64, device=device),
                       torch.randn(3, device=device)])


SCENARIOS = {
    "all": lambda device: make_params([10, 300, 7], torch.float32, device),
    "some-none": _some_none,
    "mixed-dtypes": _mixed_dtypes,
    "non-contiguous": _non_contiguous,
    "views-of-one-buffer": _views_of_one_buffer,
    "zero-elements": _zero_elements,
    "sparse": _sparse,
    "complex": _complex,
}


def _plan_facts(plan):
    if plan is None:
        return None
    return (plan.device, plan.fallback, plan.update_fallback, plan.dtypes,
            plan.all_contiguous, plan.numel.tolist(),
            [(w.dtype, w.positions, w.n_work) for w in plan.groups],
            [(w.dtype, w.positions, w.n_work) for w in plan.update_groups])


def _route_facts(route):
    if route is None:
        return None
    return (route.device, route.backend, route.dtypes, route.all_contiguous,
            _plan_facts(route.plan))


@needs_native
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_native_walk_gives_what_python_gives(backend_device, scenario):
    params = SCENARIOS[scenario](backend_device)
    names = [f"p{i}" for i in range(len(params))]
    results = {}
    for path in ("native", "python"):
        worklist.clear_plan_cache()
        grads, kept_names, route = on_path(path, lambda: gradients_and_route(params, names))
        # A named route's all_contiguous may be unknown (None) without a plan on Python's
        # path; the native walk always knows it. Compare where Python knows.
        results[path] = grads, kept_names, _route_facts(route)
    (native_grads, native_names, native_route), (py_grads, py_names, py_route) = (
        results["native"], results["python"])
    assert [id(g) for g in native_grads] == [id(g) for g in py_grads]
    assert all(g is p.grad for g, p in zip(native_grads, [p for p in params
                                                          if p.grad is not None]))
    assert native_names == py_names
    if py_route is not None and py_route[3] is None:
        native_route = native_route[:3] + (None,) + native_route[4:]
    assert native_route == py_route


@needs_native
def test_no_gradients_gives_no_route():
    params = make_params([3, 4], torch.float32, "cpu")
    for param in params:
        param.grad = None
    assert gradients_and_route(params, ["a", "b"]) == ([], [], None)
    assert native.host_pass(params, True)[:3] == ([], [], None)


@needs_native
def test_route_of_tensors_matches_python_across_devices():
    """Two devices (``meta`` stands in for a second one): no backend, no plan."""
    tensors = [torch.randn(3), torch.empty(4, device="meta"), torch.randn(2)]
    routes = [_route_facts(on_path(p, lambda: dispatch.route(tensors)))
              for p in ("native", "python")]
    assert routes[0] == routes[1]
    assert routes[0][1] is None and routes[0][0] == torch.device("cpu")


# --- the native plan key: exact hits ---------------------------------------------------

@needs_native
def test_same_gradients_hit_the_same_plan(triton_device):
    params = make_params([10, 300, 7], torch.float32, triton_device)
    first = gradients_and_route(params, None)[2]
    again = gradients_and_route(params, None)[2]
    assert again.plan is first.plan


@needs_native
def test_new_gradient_objects_at_the_same_addresses_hit(triton_device):
    params = make_params([10, 300, 7], torch.float32, triton_device)
    first = gradients_and_route(params, None)[2]
    for param in params:
        param.grad = param.grad.detach()  # a new object on the same memory
    assert gradients_and_route(params, None)[2].plan is first.plan


@needs_native
def test_moved_gradient_misses_and_clips_like_torch(triton_device):
    params = make_params([10, 300, 7], torch.float32, triton_device)
    first = gradients_and_route(params, None)[2]
    params[1].grad = params[1].grad.clone()  # new memory
    route = gradients_and_route(params, None)[2]
    assert route.plan is not first.plan
    assert route.plan.groups[0].ptrs.tolist()[1] == params[1].grad.data_ptr()
    twins = clone_params(params)
    total = gradstats.fused_clip_grad_norm_(params, 0.5)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(twins, 0.5))
    for param, twin in zip(params, twins):
        torch.testing.assert_close(param.grad, twin.grad)


@needs_native
def test_dtype_change_at_the_same_address_misses(triton_device):
    half = torch.randn(16, dtype=torch.float16, device=triton_device)
    routes = [dispatch.route([half]), dispatch.route([half.view(torch.bfloat16)])]
    assert routes[0].plan is not routes[1].plan
    assert [r.plan.groups[0].dtype for r in routes] == [torch.float16, torch.bfloat16]


@needs_native
def test_reshaped_contiguous_gradient_keeps_its_plan(triton_device):
    """As with Python's key: address, count and dtype fix a contiguous tensor's memory."""
    flat = torch.randn(24, device=triton_device)
    assert dispatch.route([flat.view(4, 6)]).plan is dispatch.route([flat]).plan


@needs_native
@pytest.mark.parametrize("other", ["transposed", "gapped"])
def test_strided_view_sharing_address_and_count_misses(triton_device, other):
    buffer = torch.randn(4, 4, device=triton_device)
    dense = buffer if other == "transposed" else buffer.view(-1)[:8]
    view = buffer.t() if other == "transposed" else buffer.view(-1)[::2]
    assert (dense.data_ptr(), dense.numel()) == (view.data_ptr(), view.numel())
    assert dispatch.route([view]).plan is not dispatch.route([dense]).plan
    assert dispatch.route([view]).all_contiguous is False


@needs_native
def test_equal_hashes_with_other_metadata_are_not_equal_keys():
    device = torch.device("cpu")
    one, other = PlanKey((device, True, b"\x01"), 7), PlanKey((device, True, b"\x02"), 7)
    assert hash(one) == hash(other) and one != other
    assert {one: "plan"}.get(other) is None
    assert {one: "plan"}.get(PlanKey((device, True, b"\x01"), 7)) == "plan"


@needs_native
def test_native_and_python_keys_never_meet(triton_device):
    tensors = [torch.randn(5, device=triton_device)]
    native_key = plan_key(tensors)
    python_key = on_path("python", lambda: plan_key(tensors))
    assert native_key != python_key
    assert python_key == worklist.plan_key(tensors, triton_device)
    route = dispatch.route(tensors)
    assert worklist.cached_plan(native_key) is route.plan


@needs_native
def test_key_holds_every_tensor_in_order():
    a, b = torch.randn(3), torch.randn(3)
    keys = [native.host_pass(tensors, False)[5:] for tensors in ([a, b], [b, a], [a], [a, a])]
    assert len(set(keys)) == 4
    assert native.host_pass([a, b], False)[5:] == native.host_pass((a, b), False)[5:]


# --- plan keys that fix the update targets (both paths) --------------------------------

def _clip_twice_like_torch(first_grads, second_grads, twin_grads):
    """Clips ``first_grads`` without changing them (a plan is cached), then
    ``second_grads``; ``twin_grads`` (clones aliased as ``second_grads`` are) by torch."""
    gradstats.fused_clip_grad_norm_(with_grads(first_grads), 1e9)
    gradstats.fused_clip_grad_norm_(with_grads(second_grads), 1.0)
    torch.nn.utils.clip_grad_norm_(with_grads(twin_grads), 1.0, foreach=False)


@pytest.mark.parametrize("with_strided_view", [False, True], ids=["contiguous", "mixed"])
def test_views_sharing_an_address_key_their_shapes(triton_device, host_path,
                                                   with_strided_view):
    """``[a, a]`` updates ``a`` once, ``[a, a.view(2, 2)]`` twice (as torch): the plan of
    one must not serve the other."""
    def extra():  # the same gradient in both lists, as a training step has
        return [strided] if with_strided_view else []

    worklist.clear_plan_cache()
    strided = torch.ones(3, 3, device=triton_device).t()
    a = torch.full((4,), 2.0, device=triton_device)
    assert plan_key([a, a, *extra()]) != plan_key([a, a.view(2, 2), *extra()])
    twin = torch.full((4,), 2.0, device=triton_device)
    strided_twin = strided.clone()
    _clip_twice_like_torch([a, a, *extra()], [a, a.view(2, 2), *extra()],
                           [twin, twin.view(2, 2), strided_twin][:len(extra()) + 2])
    torch.testing.assert_close(a, twin)


def test_a_reshaped_view_listed_twice_misses(triton_device, host_path):
    a = torch.randn(6, device=triton_device)
    assert plan_key([a, a.view(2, 3)]) != plan_key([a, a.view(3, 2)])
    assert plan_key([a, a.view(2, 3)]) == plan_key([a, a.view(2, 3)])


def test_sparse_gradients_key_their_identity(triton_device, host_path):
    """One sparse gradient listed twice is scaled once; two equal ones are each scaled."""
    worklist.clear_plan_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse tensors' beta-state warning
        once = torch.full((2, 2), 3.0, device=triton_device).to_sparse()
        first, second = (torch.full((2, 2), 3.0, device=triton_device).to_sparse()
                         for _ in range(2))
        assert plan_key([once, once]) != plan_key([first, second])
        gradstats.fused_clip_grad_norm_(with_grads([once, once]), 1e9)
        gradstats.fused_clip_grad_norm_(with_grads([first, second]), 1.0)
    # torch's clip has no sparse path: the float64 value, total norm sqrt(8 * 3^2).
    total = torch.tensor(8 * 3.0 ** 2, dtype=torch.float64).sqrt()
    expected = torch.full((2, 2), 3.0, dtype=torch.float64) / (total + 1e-6)
    for grad in (first, second):
        torch.testing.assert_close(grad.to_dense().cpu(), expected.float())


@needs_native
def test_an_unchanged_key_is_the_same_object():
    """The walk returns the last key's bytes object for the same bytes, and the plan key
    made from it is the same object (the plan cache then finds it by identity); a changed
    gradient gives new ones."""
    params = make_params([10, 300, 7], torch.float32, "cpu")
    first = native.host_pass(params, True)
    again = native.host_pass(params, True)
    assert again.key_bytes is first.key_bytes
    assert dispatch.native_plan_key(again) is dispatch.native_plan_key(first)
    params[1].grad = params[1].grad.clone()  # new memory: another key
    moved = native.host_pass(params, True)
    assert moved.key_bytes != first.key_bytes
    assert dispatch.native_plan_key(moved) != dispatch.native_plan_key(first)
    native.host_pass(params[:2], True)  # another list between two calls
    assert native.host_pass(params, True).key_bytes == moved.key_bytes


@needs_native
def test_key_holds_ndim_beyond_a_byte():
    """torch allows hundreds of dimensions: the key's ndim is a word of its own."""
    dims = 300
    buffer = torch.randn(4)
    view = buffer.as_strided([1] * (dims - 2) + [2, 2], [1] * (dims - 2) + [1, 2])
    assert view.dim() == dims and not view.is_contiguous()
    facts = native.host_pass([view], False)
    words = memoryview(facts[6]).cast("Q")
    # header, address, count, ndim, sizes, strides
    assert len(words) == 4 + 2 * dims and words[3] == dims
    assert list(words[4:4 + dims]) == list(view.shape)
    assert list(words[4 + dims:]) == list(view.stride())


# --- the walk's memory safety ------------------------------------------------------------

_FINALISER_DROPS_GRADIENTS = """
import gc, torch
from gradstats import _C
# More parameters than the walk reads ahead (csrc/host_path.cpp, read_ahead): pointers it
# read for later items go stale when the finaliser runs.
params = [torch.nn.Parameter(torch.randn(3)) for _ in range(64)]
class DropGrads:
    def __init__(self):
        self.cycle = self  # only the cyclic collector frees it
    def __del__(self):
        for p in params:
            p.grad  # a Python object for the gradient, then none at all
            p.grad = None
        del params[40:]  # and later parameters leave the list (freed with their tensors)
for _ in range(50):
    while len(params) < 64:
        params.append(torch.nn.Parameter(torch.randn(3)))
    sum((p * p).sum() for p in params).backward()  # gradients without Python objects
    for p in params[:30]:
        p.grad  # ... but for the first 30: the walk reads ahead before it collects
    gc.disable()
    DropGrads()
    gc.enable()
    gc.set_threshold(1)  # the walk's first new gradient object collects
    _C.host_pass(params, True)
    gc.set_threshold(700)
print("survived")
"""


@needs_native
def test_finaliser_dropping_gradients_during_the_walk_is_safe():
    """A garbage collection inside the walk (making a gradient's Python object) may run a
    finaliser that sets ``p.grad = None``: the walk must hold the gradient it is reading.
    In a subprocess, so a crash fails this test rather than ending pytest."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FINALISER_DROPS_GRADIENTS],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "survived"


@needs_native
def test_warning_raised_as_error_leaks_no_gradient():
    """``.grad`` of a non-leaf warns; a filter that makes it an error raises after the
    walk built its result, which must then be dropped with its gradient references."""
    import sys

    param = torch.nn.Parameter(torch.randn(5))
    param.grad = torch.randn(5)
    non_leaf = torch.randn(3, requires_grad=True) * 2
    grad = param.grad
    before = sys.getrefcount(grad)
    for _ in range(20):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning, match="not a leaf Tensor"):
                native.host_pass([param, non_leaf], True)
    assert sys.getrefcount(grad) == before


@needs_native
def test_the_walk_leaves_reference_counts_as_they_were():
    """Parameters without a gradient, gradients with a Python object and gradients made by
    autograd without one: after the result is dropped, every count is back."""
    import sys

    with_grad = torch.nn.Parameter(torch.randn(5))
    with_grad.grad = torch.randn(5)
    fresh = torch.nn.Parameter(torch.randn(4))
    frozen = [torch.nn.Parameter(torch.randn(3)) for _ in range(50)]  # no .grad
    objects = [with_grad, with_grad.grad, fresh, *frozen]
    nones = sys.getrefcount(None)
    for _ in range(20):
        fresh.grad = None
        (fresh * 2).sum().backward()  # a gradient with no Python object yet
        before = [sys.getrefcount(o) for o in objects]
        facts = native.host_pass([with_grad, *frozen, fresh], True)
        assert len(facts.tensors) == 2 and facts.tensors[0] is with_grad.grad
        del facts
        assert [sys.getrefcount(o) for o in objects] == before
    # None's count moves with whatever else the interpreter does; a reference kept per
    # parameter without a gradient would add 1,000 here.
    assert abs(sys.getrefcount(None) - nones) < 100


# --- what the native walk leaves to Python ---------------------------------------------

class _Subclass(torch.Tensor):
    pass


@needs_native
@pytest.mark.parametrize("items", [
    pytest.param(lambda: [torch.randn(3), torch.randn(2).as_subclass(_Subclass)], id="subclass"),
    pytest.param(lambda: [torch.randn(3), 4], id="not-a-tensor"),
    pytest.param(lambda: iter([torch.randn(3)]), id="iterator"),
    pytest.param(lambda: [torch.randn(2, 2).to_mkldnn()], id="mkldnn",
                 marks=pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                          reason="no mkldnn")),
])
def test_input_the_walk_cannot_describe_is_left_to_python(items):
    assert native.host_pass(items(), False) is None


@needs_native
def test_a_torch_function_mode_is_left_to_python():
    from torch.overrides import TorchFunctionMode

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    params = make_params([3], torch.float32, "cpu")
    with Passthrough():
        assert native.host_pass(params, True) is None
        grads, _, route = gradients_and_route(params, None)
    assert grads[0] is params[0].grad and route is not None


@needs_native
def test_first_non_tensor():
    tensors = [torch.randn(2), torch.nn.Parameter(torch.randn(2)),
               torch.randn(2).as_subclass(_Subclass)]
    assert native.first_non_tensor(tensors) == -1
    assert native.first_non_tensor(tensors + ["x", torch.randn(1)]) == 3
    assert native.first_non_tensor(()) == -1


def test_non_leaf_gradient_read_warns_as_python_does(host_path):
    leaf = torch.randn(3, requires_grad=True)
    non_leaf = leaf * 2
    with pytest.warns(UserWarning, match="not a leaf Tensor"):
        grads, _, route = gradients_and_route([non_leaf], None)
    assert grads == [] and route is None


def test_leaf_gradients_read_without_warnings(host_path):
    params = make_params([3, 4], torch.float32, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads, _, _ = gradients_and_route(params, None)
    assert [g is p.grad for g, p in zip(grads, params)] == [True, True]


# --- every entry point: same results, same errors, on both paths -----------------------

# A view listed twice is scaled once here, twice by torch (clip.py's docstring): that
# scenario is compared between the paths below instead.
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s not in
                                      ("sparse", "complex", "views-of-one-buffer")])
def test_clip_matches_torch(backend_device, host_path, scenario):
    params = SCENARIOS[scenario](backend_device)
    twins = clone_params(params)
    for _ in range(2):  # the second call finds its plan
        total = gradstats.fused_clip_grad_norm_(params, 0.5)
        expected = torch.nn.utils.clip_grad_norm_(twins, 0.5)
        torch.testing.assert_close(total, expected, rtol=2e-2, atol=1e-5)
        for param, twin in zip(params, twins):
            if twin.grad is None:
                assert param.grad is None
            else:
                torch.testing.assert_close(param.grad, twin.grad, rtol=2e-2, atol=1e-5)


@needs_native
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_stats_monitor_and_clip_equal_on_both_paths(backend_device, scenario):
    results = []
    for path in ("native", "python"):
        torch.manual_seed(7)
        params = SCENARIOS[scenario](backend_device)  # the same values on both paths
        stats = on_path(path, lambda: gradstats.grad_stats(params, num_bins=8, min_exp=-4))
        monitor = gradstats.GradMonitor(params, sinks=None)
        total = on_path(path, lambda: monitor.step())
        monitor.close()
        clipped = outcome(lambda: on_path(path, lambda: gradstats.fused_clip_grad_norm_(
            params, 0.5)))
        results.append((stats.norms, stats.total_norm, stats.nonfinite, stats.hist,
                        stats.numel, total, clipped[1],
                        [None if p.grad is None else p.grad.to_dense() for p in params]))
    for native_value, python_value in zip(*results):
        torch.testing.assert_close(native_value, python_value, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("case", [
    "not-a-tensor", "sparse-composed-norm", "expanded", "int-tensors", "two-devices",
    "non-finite",
])
def test_errors_are_the_same_on_both_paths(case):
    def params():
        if case == "not-a-tensor":
            return [torch.nn.Parameter(torch.randn(2)), 3]
        if case == "sparse-composed-norm":
            return _sparse("cpu")
        if case == "expanded":
            return with_grads([torch.randn(3), torch.randn(1).expand(4)])
        if case == "two-devices":
            return with_grads([torch.randn(3), torch.randn(2, device="meta")])
        if case == "non-finite":
            return with_grads([torch.randn(3), torch.tensor([1.0, float("nan")])])
        return None

    def call():
        if case == "int-tensors":
            return gradstats.get_total_norm([torch.ones(3), torch.arange(4)])
        norm_type = 0.0 if case == "sparse-composed-norm" else 2.0
        return gradstats.fused_clip_grad_norm_(params(), 0.5, norm_type=norm_type,
                                               error_if_nonfinite=True)

    outcomes = [outcome(lambda: on_path(path, call)) for path in ("native", "python")]
    assert outcomes[0][0] != "returned"
    if outcomes[0][0] == "returned":
        torch.testing.assert_close(outcomes[0][1], outcomes[1][1])
    else:
        assert outcomes[0] == outcomes[1]
