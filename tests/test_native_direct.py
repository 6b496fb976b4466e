"""The direct calls of gradstats._C (csrc/direct_calls.cpp): the statistics pass and element
counts on a Python list, beside the dispatcher. They must give the op's exact results, and
step aside (return None) wherever the dispatcher would do more than call the CPU kernel."""
import math
import sys
import threading
import time

import pytest
import torch
from helpers import RecordingMode
from torch.overrides import TorchFunctionMode

import gradstats
from gradstats import native
from gradstats.norms import norm_kind

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"{native.unavailable_reason()}")

CHUNK = native.NATIVE_CHUNK
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def direct(tensors, p=2.0, num_bins=16, min_exp=-20):
    return native.cpu_stats_direct(tensors, p, norm_kind(p), num_bins, min_exp)


def op(tensors, p=2.0, num_bins=16, min_exp=-20):
    return native.cpu_stats(tensors, p, norm_kind(p), num_bins, min_exp)


def mixed_tensors(dtype):
    torch.manual_seed(0)
    tensors = [torch.randn(n).to(dtype) for n in (0, 1, 17, 1000, CHUNK, 2 * CHUNK + 3)]
    tensors.append(torch.randn(40, 30).to(dtype).t())  # permuted-dense: read in place
    tensors.append(torch.tensor([0.0, math.nan, -math.inf, 1e-30]).to(dtype))
    return tensors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("num_bins", [0, 16])
def test_direct_call_gives_the_ops_bits(dtype, p, num_bins):
    tensors = mixed_tensors(dtype)
    ours = direct(tensors, p, num_bins)
    assert ours is not None
    for mine, theirs in zip(ours, op(tensors, p, num_bins)):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        assert torch.equal(mine.view(torch.int64) if mine.is_floating_point() else mine,
                           theirs.view(torch.int64) if theirs.is_floating_point() else theirs)


def test_direct_call_on_thousands_of_small_tensors_gives_the_ops_bits():
    torch.manual_seed(1)
    tensors = [torch.randn(n) for n in [256, 4096, 3] * 700]
    for mine, theirs in zip(direct(tensors, num_bins=64, min_exp=-40),
                            op(tensors, num_bins=64, min_exp=-40)):
        assert torch.equal(mine, theirs)


def test_direct_call_on_an_empty_list():
    power, nonfinite, hist = direct([], num_bins=8)
    assert power.shape == (0,) and nonfinite.shape == (0,) and hist.shape == (0, 8)


def test_direct_call_outputs_carry_no_autograd_history():
    weight = torch.randn(5, requires_grad=True)
    with torch.enable_grad():
        outputs = direct([weight])
    assert not any(output.requires_grad for output in outputs)
    assert outputs[0].item() == pytest.approx(weight.detach().double().square().sum().item())


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("odd_one", ["subclass", "negative view", "meta", "not a tensor"])
def test_direct_call_steps_aside_for_what_the_dispatcher_treats_differently(odd_one):
    plain = torch.randn(8)
    other = {
        "subclass": lambda: torch.randn(8).as_subclass(_Subclass),
        "negative view": lambda: torch._neg_view(torch.randn(8)),
        "meta": lambda: torch.empty(8, device="meta"),
        "not a tensor": lambda: 1.0,
    }[odd_one]()
    assert direct([plain, other]) is None
    assert native.numel_tensor([plain, other]) is None


def test_direct_call_steps_aside_under_dispatch_and_function_modes():
    tensors = [torch.randn(8)]
    with RecordingMode():
        assert direct(tensors) is None
    with TorchFunctionMode():
        assert direct(tensors) is None
    assert direct(tensors) is not None


def test_grad_stats_under_a_dispatch_mode_calls_the_op_the_mode_sees(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    params = [torch.nn.Parameter(torch.randn(6)) for _ in range(3)]
    for param in params:
        param.grad = torch.randn(6)
    expected = gradstats.grad_stats(params)
    mode = RecordingMode()
    with mode:
        seen = gradstats.grad_stats(params)
    assert any("gradstats.cpu_stats" in name for name in mode.ops)
    torch.testing.assert_close(seen.norms, expected.norms, rtol=0, atol=0)


def test_direct_call_raises_the_ops_error_for_a_tensor_with_gaps():
    with pytest.raises(RuntimeError, match="contiguous or permuted-dense"):
        direct([torch.randn(10)[::2]])


def test_numel_tensor_reads_every_count():
    tensors = [torch.empty(0), torch.empty(3, 5), torch.empty(2, 0, 4), torch.empty(7).t()]
    counts = native.numel_tensor(tensors)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [0, 15, 0, 7]


def test_grad_stats_compiles_with_fullgraph_and_gives_eager_results(monkeypatch):
    # collect_stats reads element counts while dynamo traces it: numel_tensor must step
    # aside before touching native._load (an lru_cache dynamo traces into, reaching
    # torch.library.register_fake, which it refuses to trace).
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 300, CHUNK + 1)]
    for param in params:
        param.grad = torch.randn_like(param)
    expected = gradstats.grad_stats(params)
    torch._dynamo.reset()
    seen = torch.compile(gradstats.grad_stats, backend="aot_eager", fullgraph=True)(params)
    torch.testing.assert_close(seen.norms, expected.norms, rtol=0, atol=0)
    assert torch.equal(seen.numel, torch.tensor([5, 300, CHUNK + 1]))
    assert torch.equal(seen.hist, expected.hist) and torch.equal(seen.nonfinite,
                                                                 expected.nonfinite)


def test_the_profiler_sees_the_direct_call_as_the_op():
    # The dispatcher records every op call for torch.profiler; the direct call must too, or
    # the statistics pass vanishes from traces (its time lands in its caller's).
    tensors = [torch.randn(8), torch.randn(3, 4)]
    with torch.profiler.profile() as profile:
        assert direct(tensors) is not None
    names = [event.name for event in profile.events()]
    assert names.count("gradstats::cpu_stats") == 1


def test_a_tensor_swapped_and_freed_mid_pass_is_read_whole_and_safely():
    # The pass runs with the GIL released, holding the listed tensors' storages only: a
    # tensor that only its Python object holds can be swapped meanwhile
    # (torch.utils.swap_tensors), its TensorImpl handed to the other object and freed with
    # it. The pass must still read the memory it was planned on, which its storage keeps
    # alive: the statistics of the data as it was at the call, and no crash (holding only
    # the Python objects, the freed memory was reused mid-pass: a segfault).
    torch.manual_seed(3)
    tensor = torch.randn(1 << 24)
    others = [torch.randn(1 << 24)]
    expected = op([tensor], p=3.0, num_bins=0)
    started, finished, outcome = threading.Event(), threading.Event(), {}

    def swap_mid_pass():
        started.wait()
        time.sleep(0.02)  # the pass (std::pow per element: ~0.15 s) runs, the GIL released
        torch.utils.swap_tensors(tensor, others[0])
        others.clear()  # the TensorImpl the pass was planned on goes with it
        outcome["reuse"] = [torch.full((1 << 24,), 7.0) for _ in range(4)]
        outcome["mid_pass"] = not finished.is_set()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    swapper = threading.Thread(target=swap_mid_pass)
    swapper.start()
    try:
        started.set()
        seen = direct([tensor], p=3.0, num_bins=0)
        finished.set()
    finally:
        swapper.join(timeout=60)
        torch.set_num_threads(threads)
    assert torch.equal(seen[0], expected[0])  # (a machine slow to swap proves less)


def test_direct_call_leaves_reference_counts_as_they_were_on_success_and_error():
    tensor, gaps = torch.randn(100), torch.randn(10)[::2]
    before = sys.getrefcount(tensor), sys.getrefcount(gaps)
    for _ in range(3):
        assert direct([tensor, tensor]) is not None
        with pytest.raises(RuntimeError, match="contiguous or permuted-dense"):
            direct([tensor, gaps])
        with pytest.raises(RuntimeError, match="num_bins"):
            direct([tensor], num_bins=1)
        assert direct([tensor, "not a tensor"]) is None
    assert (sys.getrefcount(tensor), sys.getrefcount(gaps)) == before
    assert tensor._use_count() == 1  # no C++ owner left behind either


def test_bump_versions_bumps_each_tensor_once_and_skips_inference_tensors():
    tensors = [torch.randn(3), torch.randn(2, 2).t(), torch.nn.Parameter(torch.randn(4))]
    with torch.inference_mode():
        inference = torch.randn(3)
    before = [t._version for t in tensors]
    assert native.bump_versions(tensors + [inference])
    assert [t._version for t in tensors] == [v + 1 for v in before]


def test_bump_versions_bumps_a_long_list_with_shared_counters_and_inference_tensors():
    """Beyond the tensors it reads ahead: views sharing a counter are bumped once each, as
    torch's in-place ops on each view would, and inference tensors anywhere are skipped."""
    base = torch.zeros(40, 3)
    tensors = [torch.randn(5) for _ in range(30)] + list(base)  # 40 views of one buffer
    with torch.inference_mode():
        inference = [torch.randn(2) for _ in range(5)]
    mixed = tensors[:10] + inference + tensors[10:]
    before = [t._version for t in tensors[:30]]
    shared_before = base._version
    assert native.bump_versions(mixed)
    assert [t._version for t in tensors[:30]] == [v + 1 for v in before]
    assert base._version == shared_before + 40


def test_bump_versions_does_nothing_for_a_list_holding_a_non_tensor():
    tensor = torch.randn(3)
    before = tensor._version
    assert not native.bump_versions([tensor, "not a tensor"])
    assert tensor._version == before


SPECS = (((5,), torch.float64, False), ((5,), torch.int64, False), ((5, 3), torch.int64, True),
         ((0,), torch.float32, False), ((), torch.bfloat16, True), ((2, 0, 4), torch.int32, True))


@pytest.mark.parametrize("native_layer", [True, False])
def test_new_tensors_makes_each_spec_on_the_device(native_layer, monkeypatch):
    if not native_layer:  # the fallback: torch.empty / torch.zeros from Python
        monkeypatch.setattr(native, "_load", lambda: "off for this test")
    made = native.new_tensors(torch.device("cpu"), SPECS)
    assert len(made) == len(SPECS)
    for tensor, (shape, dtype, zeroed) in zip(made, SPECS):
        assert tensor.shape == shape and tensor.dtype == dtype
        assert tensor.device.type == "cpu" and tensor.is_contiguous()
        assert not tensor.requires_grad
        if zeroed:
            assert torch.equal(tensor, torch.zeros(shape, dtype=dtype))
    assert len({t.data_ptr() for t in made if t.numel()}) == sum(1 for t in made if t.numel())


class _RecordingFunctionMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def test_new_tensors_steps_aside_under_a_function_mode_so_the_mode_sees_torch_empty():
    with _RecordingFunctionMode() as mode:
        assert native._extension().new_tensors(torch.device("cpu"), SPECS[:1]) is None
        (made,) = native.new_tensors(torch.device("cpu"), SPECS[:1])
    assert made.shape == (5,) and torch.empty in mode.funcs


def test_new_tensors_is_seen_by_a_dispatch_mode():
    with RecordingMode() as mode:
        native.new_tensors(torch.device("cpu"), SPECS[:3])
    assert str(torch.ops.aten.empty.memory_format) in mode.ops


@pytest.mark.parametrize("specs, message", [
    ((((5,), "float64", False),), "spec"),
    ((((5,), torch.float64),), "spec"),
    (([5], torch.float64, False), "spec"),
    ((((5.5,), torch.float64, False),), "integer"),
    ((((-1,), torch.float64, False),), "negative"),
])
def test_new_tensors_rejects_malformed_specs(specs, message):
    with pytest.raises((TypeError, RuntimeError), match=message):
        native._extension().new_tensors(torch.device("cpu"), specs)
