"""The timing script of this folder's rounds (see ../README.md): gradstats.grad_stats on
4,500 small tensors with the native backend, one thread, with and without the histogram;
15 blocks of 40 calls after 30 warm-up calls; the lowest and the median block, in us.

    cd TREE && PYTHONPATH=TREE taskset -c CORE python many_small_calls.py [CASE]

CASE ("fp32 hist", ...) times that case alone: two processes at once then spend the whole
run on the same case (run in sequence, the cases of two processes drift apart in time).
"""
import os
import statistics
import sys
import time

os.environ["GRADSTATS_BACKEND"] = "native"

import torch  # noqa: E402

import gradstats  # noqa: E402
from benchmarks.workloads import WORKLOADS, make_params  # noqa: E402

torch.set_num_threads(1)
results = {}
only = sys.argv[1] if len(sys.argv) > 1 else None
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    params = make_params(WORKLOADS["many-small"](), dtype, torch.device("cpu"))
    for histogram in (False, True):
        case = f"{name} {'hist' if histogram else 'nohist'}"
        if only is not None and case != only:
            continue
        def call():
            gradstats.grad_stats(params, histogram=histogram)

        for _ in range(30):
            call()
        blocks = []
        for _ in range(15):
            start = time.perf_counter()
            for _ in range(40):
                call()
            blocks.append((time.perf_counter() - start) / 40 * 1e6)
        results[case] = (min(blocks), statistics.median(blocks))
for case, (lowest, median) in results.items():
    print(f"{case:12s} min {lowest:8.1f} med {median:8.1f}")
