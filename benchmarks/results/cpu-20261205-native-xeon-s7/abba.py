"""A/B of one build-time switch read per call from the environment (a temporary build, not
kept), in one process, one thread: `variable` set (B) or unset (A), the order alternating
every round (A B, then B A), both dtypes of the same bytes (bf16 with twice the first
dimension). Reports medians and the median of per-round B/A ratios.

    python abba.py WORKLOAD CASE VARIABLE ROUNDS     (CASE: read = clip_grad_norm_ with no
    clipping needed, scale = cpu_scale_ by 0.9999)
"""
import os
import statistics
import sys
import time

os.environ["GRADSTATS_BACKEND"] = "native"
import torch

torch.set_num_threads(1)
import gradstats
from benchmarks.workloads import WORKLOADS, make_params
from gradstats import native

workload, case, variable, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
shapes = WORKLOADS[workload]()
sets = {"fp32": make_params(shapes, torch.float32, torch.device("cpu")),
        "bf16": make_params([(2 * s[0], *s[1:]) for s in shapes], torch.bfloat16,
                            torch.device("cpu"))}
coef = torch.tensor(0.9999)
grads = {name: [p.grad for p in params] for name, params in sets.items()}


def call(name):
    if case == "read":
        gradstats.clip_grad_norm_(sets[name], 1e9)
    else:
        native.cpu_scale_(grads[name], coef)


def timed(name, b: bool) -> float:
    if b:
        os.environ[variable] = "1"
    else:
        os.environ.pop(variable, None)
    start = time.perf_counter()
    call(name)
    return (time.perf_counter() - start) * 1e3


for name in sets:
    timed(name, False), timed(name, True)
    a_ms, b_ms, ratios = [], [], []
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {b: timed(name, b) for b in order}
        a_ms.append(got[False]), b_ms.append(got[True]), ratios.append(got[True] / got[False])
    q = statistics.quantiles(ratios, n=4)
    print(f"{workload} {case} {name} {variable}: A {statistics.median(a_ms):.3f} ms, "
          f"B {statistics.median(b_ms):.3f} ms, B/A {statistics.median(ratios):.3f} "
          f"(IQR {q[0]:.3f}-{q[2]:.3f}, {rounds} rounds)", flush=True)
