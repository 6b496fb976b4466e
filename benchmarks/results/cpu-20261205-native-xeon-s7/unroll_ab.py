"""The statistics pass's chunk loop plain and unrolled by 2, alternating per call in one process
(clip_grad_norm_, no clipping needed, one thread). Needs a temporary build (not kept) that
unrolls when EXP_UNROLL is set.
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

w = sys.argv[1]
shapes = WORKLOADS[w]()
f = make_params(shapes, torch.float32, torch.device("cpu"))
b = make_params([(2*s[0], *s[1:]) for s in shapes], torch.bfloat16, torch.device("cpu"))
n = int(sys.argv[2])
def once(ps):
    a = time.perf_counter(); gradstats.clip_grad_norm_(ps, 1e9); return (time.perf_counter() - a) * 1e3
res = {}
for name, ps in (("fp32", f), ("bf16", b)):
    for flag in (0, 1):
        if flag: os.environ["EXP_UNROLL"] = "1"
        else: os.environ.pop("EXP_UNROLL", None)
        once(ps)
samples = {(d, u): [] for d in ("fp32", "bf16") for u in (0, 1)}
for _ in range(n):
    for name, ps in (("fp32", f), ("bf16", b)):
        for flag in (0, 1):
            if flag: os.environ["EXP_UNROLL"] = "1"
            else: os.environ.pop("EXP_UNROLL", None)
            samples[(name, flag)].append(once(ps))
med = {k: statistics.median(v) for k, v in samples.items()}
print(w, {f"{d}/{'unroll' if u else 'plain'}": round(v, 3) for (d, u), v in med.items()},
      "bf16/fp32 plain", round(med[("bf16", 0)] / med[("fp32", 0)], 3),
      "unroll", round(med[("bf16", 1)] / med[("fp32", 1)], 3))
