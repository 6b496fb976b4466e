"""Timers: CUDA events through triton.testing.do_bench on GPUs, perf_counter medians on CPUs."""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, device: torch.device, cpu_repeats: int = 3) -> float:
    """Median time of ``fn()`` in milliseconds, warmed up."""
    if device.type == "cuda":
        import triton.testing

        # do_bench flushes L2 between repeats and times with CUDA events.
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    samples = []
    for _ in range(cpu_repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def host_us_per_call(fn, device: torch.device, calls: int = 20, before_each=None) -> float:
    """Host time to issue one call (Python, argument handling, launches), without waiting
    for the GPU."""
    fn()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(calls):
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize(device)
    return statistics.median(samples)
