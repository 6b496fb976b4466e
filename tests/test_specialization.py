"""Recompiles from specialization churn: what one call site hands each Triton kernel must
not change with the tensor count, the work-item count or histogram settings that are off.

Triton compiles one kernel per specialization: the constexpr values, and for each
non-constexpr argument its type plus, unless ``do_not_specialize``, whether an integer is
1 or a multiple of 16 and whether a pointer is 16-byte aligned. No GPU here: the launches
are wrapped by recorders that read that key from the real arguments and then run the
kernel in the interpreter, so results are checked by the rest of the suite as usual.
"""
import inspect

import pytest
import torch
from helpers import make_grads, make_params

import gradstats
from gradstats import worklist
from gradstats.kernels import apply, finalize, stats

KERNELS = [(stats, "_stats_kernel"), (stats, "_reduce_chunks_kernel"),
           (finalize, "_finalize_kernel"), (apply, "_update_kernel")]
# Sizes around the tiny chunk (256 elements): 1 to 3 work items per tensor.
SIZES = [100, 300, 256, 600, 7, 513]


def _constexpr_names(fn) -> set[str]:
    return {name for name, param in inspect.signature(fn).parameters.items()
            if "constexpr" in str(param.annotation)}


def _not_specialized(kernel) -> set[str]:
    names = getattr(kernel, "do_not_specialize", None)  # a JITFunction
    if names is None:  # the interpreter's InterpretedFunction keeps the jit arguments
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or []
    return set(names)


def _specialization(kernel, args, kwargs) -> tuple[dict, tuple]:
    """(constexprs, runtime key) of one launch, by Triton's rules for the latter."""
    fn = kernel.fn
    bound = inspect.signature(fn).bind_partial(
        *args, **{k: v for k, v in kwargs.items() if k in inspect.signature(fn).parameters})
    constexprs, runtime = {}, []
    skip = _not_specialized(kernel)
    for name, value in bound.arguments.items():
        if name in _constexpr_names(fn):
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            runtime.append((name, value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            runtime.append((name, type(value).__name__))
        elif isinstance(value, int):
            facts = () if name in skip else (value == 1, value % 16 == 0)
            runtime.append((name, "int", facts))
        else:
            runtime.append((name, repr(value)))
    options = tuple(sorted((k, v) for k, v in kwargs.items()
                           if k not in inspect.signature(fn).parameters))
    return constexprs, tuple(runtime) + options


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch recorded as (kernel name, constexprs, runtime key), then run."""
    recorded = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                constexprs, key = _specialization(self.kernel, args, kwargs)
                recorded.append((self.name, constexprs, key))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(name, getattr(module, name)))
    return recorded


def _by_kernel(recorded, part):
    seen: dict[str, list] = {}
    for name, constexprs, key in recorded:
        value = constexprs if part == "constexprs" else key
        if value not in seen.setdefault(name, []):
            seen[name].append(value)
    return seen


def _parity_lists(device):
    """Gradient lists whose tensor counts n and work-item counts W (tiny chunks) cover
    every parity pair: (n, W) = (1, 1), (1, 2), (2, 3), (2, 4), (3, 4), (4, 7), (5, 8)."""
    size_lists = [[100], [300], [100, 300], [300, 300], SIZES[:3], SIZES[:4], SIZES[:5]]
    return [make_params(sizes, torch.float32, device) for sizes in size_lists]


def test_parity_lists_cover_every_parity_of_tensor_and_work_counts(small_chunks):
    parities = set()
    for params in _parity_lists(torch.device("cpu")):
        work = worklist.plan_for([p.grad for p in params], torch.device("cpu")).groups[0]
        parities.add((work.n_tensors % 2, work.n_work % 2))
    assert parities == {(0, 0), (0, 1), (1, 0), (1, 1)}


@pytest.mark.parametrize("call", [
    lambda ps: gradstats.clip_grad_norm_(ps, 1e-3),
    lambda ps: gradstats.fused_clip_grad_norm_(ps, 1e-3),
    lambda ps: gradstats.grad_stats(ps, max_norm=1e-3, histogram=False),
    lambda ps: gradstats.grad_stats(ps, histogram=False, num_bins=16, min_exp=-150),
], ids=["clip_grad_norm_", "fused_clip_grad_norm_", "grad_stats-no-hist",
        "grad_stats-no-hist-bins"])
def test_one_call_site_compiles_each_kernel_once_whatever_n_and_w(triton_device, small_chunks,
                                                                  launches, call):
    for params in _parity_lists(triton_device):
        call(params)
    assert launches, "no launch was made"
    for part in ("constexprs", "runtime"):
        variants = _by_kernel(launches, part)
        assert all(len(v) == 1 for v in variants.values()), (part, variants)


def test_calls_without_histogram_share_the_statistics_kernels(triton_device, small_chunks,
                                                              launches):
    grads = make_grads([300, 100], torch.float32, triton_device)
    gradstats.get_total_norm(grads)
    gradstats.clip_grad_norm_([torch.nn.Parameter(g.clone()) for g in grads], 1.0)
    params = make_params([300, 100], torch.float32, triton_device)
    gradstats.grad_stats(params, histogram=False)  # default num_bins=64, min_exp=-40
    gradstats.grad_stats(params, histogram=False, num_bins=1024, min_exp=-1080)
    gradstats.grad_stats(params, histogram=False, num_bins=2, min_exp=5)
    variants = _by_kernel([r for r in launches if r[0] != "_update_kernel"], "constexprs")
    assert set(variants) == {"_stats_kernel", "_reduce_chunks_kernel", "_finalize_kernel"}
    assert all(len(v) == 1 for v in variants.values()), variants
    assert variants["_stats_kernel"][0]["HISTOGRAM"] is False


def test_histogram_settings_still_reach_the_kernel_when_on(triton_device, small_chunks,
                                                          launches):
    params = make_params([300], torch.float32, triton_device)
    gradstats.grad_stats(params, num_bins=16, min_exp=-10)
    gradstats.grad_stats(params, num_bins=32, min_exp=-20)
    seen = [(c["NUM_BINS"], c["MIN_EXP"]) for name, c, _ in launches if name == "_stats_kernel"]
    assert seen == [(16, -10), (32, -20)]


@pytest.mark.parametrize("n_tensors", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("extra_work", [0, 1])
def test_every_meta_slice_is_16_byte_aligned(small_chunks, n_tensors, extra_work):
    # n tensors of one chunk each, the last one of two when extra_work: W = n + extra_work.
    sizes = [100] * n_tensors
    sizes[-1] += 256 * extra_work
    grads = make_grads(sizes, torch.float32, torch.device("cpu"))
    work = worklist.plan_for(grads, torch.device("cpu")).groups[0]
    assert (work.n_tensors, work.n_work) == (n_tensors, n_tensors + extra_work)
    assert work.meta.data_ptr() % 16 == 0
    parts = {name: getattr(work, name) for name in
             ("ptrs", "numels", "slots", "first_work", "work_tensor", "work_chunk")}
    misaligned = {name: part.data_ptr() % 16 for name, part in parts.items()
                  if part.data_ptr() % 16}
    assert not misaligned
    # The padding moved the parts, not their contents.
    assert parts["ptrs"].tolist() == [g.data_ptr() for g in grads]
    assert parts["numels"].tolist() == sizes
    assert parts["slots"].tolist() == list(range(n_tensors))
    assert parts["first_work"].tolist() == list(range(n_tensors + 1))[:n_tensors] + [
        n_tensors + extra_work]
    assert parts["work_tensor"].tolist() == list(range(n_tensors)) + [n_tensors - 1] * extra_work
    assert parts["work_chunk"].tolist() == [0] * n_tensors + [1] * extra_work


def test_unaligned_gradients_share_the_kernels_of_aligned_ones(triton_device, small_chunks,
                                                               launches):
    # The kernels decide alignment per work item (kernels/chunks.py), so a view off a
    # 16-byte boundary, alone or among aligned gradients, compiles nothing new.
    flat = torch.randn(2000, device=triton_device)
    aligned = make_grads([300, 100], torch.float32, triton_device)
    counts = []
    for grads in (aligned, [aligned[0], flat[1:301]], [flat[3:303], flat[400:500]]):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for param, grad in zip(params, grads):
            param.grad = grad
        gradstats.clip_grad_norm_(params, 1e-3)
        gradstats.grad_stats(params)
        counts.append({part: {name: len(v) for name, v in _by_kernel(launches, part).items()}
                       for part in ("constexprs", "runtime")})
    assert counts[0]["constexprs"]["_stats_kernel"] == 2  # histogram on and off
    assert counts[1] == counts[2] == counts[0]
