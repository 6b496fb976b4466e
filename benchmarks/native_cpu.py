"""The native CPU statistics pass against one plain sum and against the per-tensor torch loop.

For each workload, dtype and case (statistics + 64-bin log2 histogram, statistics only),
two pairs measured in the same run: native / sum (timing.paired_ms), where "sum" is one
``sum()`` over a flat buffer holding as many bytes as all the gradients (the cost of reading
them once: the floor), and native / torch loop, where the loop is what users write today
without gradstats (baselines.python_loop_log2_stats: per tensor a norm, a NaN/Inf count and,
with the histogram, a histc of log2|grad|), alternating LOOP_ROUNDS times. "native" is
``gradstats.grad_stats`` with ``GRADSTATS_BACKEND=native`` (``gradstats._C``), its Python
overhead included. A last row per workload and dtype times collecting the gradients alone
(the C++ walk from parameters to their ``.grad``, the first step of every call) against the
same sum: a floor for the whole call.

    python -m benchmarks.native_cpu [--workloads gpt2-small,many-small] [--dtypes fp32,bf16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import gradstats
from benchmarks.baselines import python_loop_log2_stats
from benchmarks.timing import paired_ms
from benchmarks.workloads import WORKLOADS, make_params
from gradstats import backend, native

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
CASES = (("stats + histogram", True), ("stats only", False))
# The torch loop is 10-100x slower than the native pass: a few alternating rounds give its
# ratio well enough and keep a full run within a few minutes.
LOOP_ROUNDS = 3


def paired_few(ours, baseline, rounds: int) -> tuple[float, float, float]:
    """(ours ms, baseline ms, median per-round ratio), the two alternating ``rounds`` times
    after one warm-up call each."""
    ours(), baseline()
    samples = []
    for _ in range(rounds):
        times = []
        for fn in (ours, baseline):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        samples.append(times)
    ours_ms = statistics.median(a for a, _ in samples)
    baseline_ms = statistics.median(b for _, b in samples)
    return ours_ms, baseline_ms, statistics.median(a / b for a, b in samples)


def measure(workload: str, dtype_name: str) -> list[str]:
    dtype = DTYPES[dtype_name]
    params = make_params(WORKLOADS[workload](), dtype, torch.device("cpu"))
    numel = sum(p.grad.numel() for p in params)
    flat = torch.randn(numel).to(dtype)
    plain_sum = lambda: flat.sum()  # noqa: E731
    lines = []
    for case, histogram in CASES:
        ours = lambda: gradstats.grad_stats(params, histogram=histogram)  # noqa: E731
        loop = lambda: python_loop_log2_stats(params, histogram=histogram)  # noqa: E731
        vs_sum = paired_ms(ours, plain_sum, flat.device)
        _, loop_ms, vs_loop = paired_few(ours, loop, LOOP_ROUNDS)
        lines.append(
            f"| {workload} | {dtype_name} | {case} | {vs_sum.ours_ms:.2f} | "
            f"{vs_sum.baseline_ms:.2f} | {loop_ms:.1f} | {vs_sum.ratio:.2f}x "
            f"(±{vs_sum.spread:.0%}) | {vs_loop:.3f} |")
    # The part of a call no pass can avoid: finding every parameter's gradient (the C++
    # walk, csrc/host_path.cpp). With thousands of small tensors it alone costs about
    # as much as one sum over all their elements.
    walk = lambda: native.host_pass(params, True)  # noqa: E731
    vs_sum = paired_ms(walk, plain_sum, flat.device)
    lines.append(
        f"| {workload} | {dtype_name} | collecting the gradients alone | {vs_sum.ours_ms:.2f} | "
        f"{vs_sum.baseline_ms:.2f} |  | {vs_sum.ratio:.2f}x (±{vs_sum.spread:.0%}) |  |")
    return lines


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="gpt2-small,many-small")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args(argv)
    if not native.available():
        raise SystemExit(f"no native layer: {native.unavailable_reason()}")
    saved = os.environ.get(backend.BACKEND_ENV)
    os.environ[backend.BACKEND_ENV] = "native"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load_average()}")
    print("| workload | dtype | case | native ms | sum ms | torch loop ms | native / sum "
          "| native / torch loop |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for workload in args.workloads.split(","):
            for dtype_name in args.dtypes.split(","):
                for line in measure(workload, dtype_name):
                    print(line, flush=True)
    finally:
        if saved is None:
            os.environ.pop(backend.BACKEND_ENV, None)
        else:
            os.environ[backend.BACKEND_ENV] = saved
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
