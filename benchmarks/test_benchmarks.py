"""pytest-benchmark suite, for tracking regressions run to run:

    pytest benchmarks --benchmark-only [--benchmark-autosave] [--benchmark-compare]

Each case times gradstats and its baseline as two benchmarks of one group, so the
comparison table pytest-benchmark prints holds the ratio. Not part of the default test
run (``testpaths = tests``). Wall-clock timings: on a GPU each call ends with a device
synchronize so the time covers the GPU work.
"""
import pytest
import torch

import gradstats
from benchmarks.baselines import python_loop_stats, python_loop_stats_with_histogram
from benchmarks.workloads import WORKLOADS, make_params

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SUITE_WORKLOADS = ["gpt2-small", "many-small"] if DEVICE == "cuda" else ["resnet50"]

IMPLEMENTATIONS = {
    "clip-no-op": {
        "gradstats": lambda ps: gradstats.fused_clip_grad_norm_(ps, 1e9),
        "torch": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1e9),
    },
    "total-norm": {
        "gradstats": lambda ps: gradstats.get_total_norm([p.grad for p in ps]),
        "torch": lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps]),
    },
    "stats": {
        "gradstats": lambda ps: gradstats.grad_stats(ps, histogram=False),
        "python-loop": python_loop_stats,
    },
    "stats-histogram": {
        "gradstats": lambda ps: gradstats.grad_stats(ps),
        "python-loop": python_loop_stats_with_histogram,
    },
}


@pytest.fixture(scope="module", params=SUITE_WORKLOADS)
def params(request):
    return make_params(WORKLOADS[request.param](), torch.float32, DEVICE)


@pytest.mark.parametrize("case,implementation", [
    (case, name) for case, impls in IMPLEMENTATIONS.items() for name in impls])
def test_benchmark(benchmark, params, case, implementation):
    fn = IMPLEMENTATIONS[case][implementation]

    def call():
        fn(params)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case} ({len(params)} tensors)"
    benchmark(call)
