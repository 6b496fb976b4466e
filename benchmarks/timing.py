"""Timers: CUDA events through triton.testing.do_bench on GPUs, perf_counter medians on CPUs.

On a CPU shared with other work a few repeats are not enough: load comes and goes, and a
row timed while the machine was busy moved 10-30x between runs. So gradstats and its
baseline are timed *in alternation*, round by round, until both have enough samples and
enough time has passed; load then hits both alike, and the ratio is the median of the
per-round ratios, with its spread reported beside it.
"""
from __future__ import annotations

import datetime
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# CPU rounds: at least MIN_ROUNDS and MIN_SECONDS of timing per pair, at most MAX_ROUNDS.
MIN_ROUNDS = 9
MAX_ROUNDS = 41
# CUDA calls timed one by one after an untimed reset (median_ms with before_each).
CUDA_RESET_REPEATS = 50
MIN_SECONDS = 2.0


@dataclass
class Paired:
    """A gradstats time and its baseline's, measured in the same run."""

    ours_ms: float  # median
    baseline_ms: float  # median
    ratio: float  # median of the per-round ratios (CPU); ours_ms / baseline_ms (GPU)
    spread: float  # CPU: interquartile range of the per-round ratios over their median; GPU: 0
    rounds: int


def median_ms(fn, device: torch.device, before_each=None) -> float:
    """Median time of ``fn()`` in milliseconds, warmed up. ``before_each``: run untimed
    before every call (restoring what the previous call changed)."""
    if device.type == "cuda":
        if before_each is not None:
            return _cuda_events_median_ms(fn, before_each, device)
        import triton.testing

        # do_bench flushes L2 between repeats and times with CUDA events.
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    reset = before_each or _nothing
    reset()
    fn()
    samples = []
    for _ in range(MIN_ROUNDS):
        reset()
        samples.append(_cpu_ms(fn))
    return statistics.median(samples)


def _cuda_events_median_ms(fn, before_each, device: torch.device) -> float:
    """``fn()`` alone between two CUDA events, ``before_each()`` queued before the first:
    do_bench would time the reset too. No L2 flush: the reset itself leaves its last
    writes in L2, as the backward before a real clip does."""
    before_each()
    fn()
    torch.cuda.synchronize(device)
    events = []
    for _ in range(CUDA_RESET_REPEATS):
        before_each()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _nothing() -> None:
    pass


def paired_ms(ours, baseline, device: torch.device, before_each=None) -> Paired:
    """Time ``ours()`` against ``baseline()``; on CPUs interleaved round by round.
    ``before_each``: run untimed before every call of either (see :func:`median_ms`)."""
    if device.type == "cuda":
        ours_ms = median_ms(ours, device, before_each)
        baseline_ms = median_ms(baseline, device, before_each)
        return Paired(ours_ms, baseline_ms, ours_ms / baseline_ms, 0.0, 0)
    reset = before_each or _nothing
    for fn in (ours, baseline):  # warm-up: plan caches, first-call allocations
        reset()
        fn()
    ours_samples, baseline_samples = [], []
    start = time.perf_counter()
    while len(ours_samples) < MAX_ROUNDS and (
            len(ours_samples) < MIN_ROUNDS or time.perf_counter() - start < MIN_SECONDS):
        reset()
        ours_samples.append(_cpu_ms(ours))
        reset()
        baseline_samples.append(_cpu_ms(baseline))
    ratios = [a / b for a, b in zip(ours_samples, baseline_samples)]
    median_ratio = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4)
    return Paired(statistics.median(ours_samples), statistics.median(baseline_samples),
                  median_ratio, (quartiles[2] - quartiles[0]) / median_ratio, len(ratios))


def _cpu_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


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


def new_results_dir(root: Path, device: torch.device) -> Path:
    """A fresh folder for one run's results, beside the committed ones (never over them):
    ``ROOT/<device>-<UTC date-time>``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{device.type}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{device.type}-{stamp}-{suffix}"
    return path
