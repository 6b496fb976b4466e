"""The scale's loop alone, bf16 / fp32 per byte, 4,500 small tensors, one thread: each
``cpu_scale_`` call (coefficient 0.9999) minus a call with coefficient 1.0 (which only
checks its arguments), under GRADSTATS_NATIVE_ISA=widest (AVX512_BF16 rounding) and avx512.
"""
import os
import statistics
import sys
import time

import torch

torch.set_num_threads(1)
from benchmarks.workloads import WORKLOADS, make_params
from gradstats import native

w = sys.argv[1] if len(sys.argv) > 1 else "many-small"
shapes = WORKLOADS[w]()
f = [p.grad for p in make_params(shapes, torch.float32, torch.device("cpu"))]
b = [p.grad for p in make_params([(2*s[0], *s[1:]) for s in shapes], torch.bfloat16, torch.device("cpu"))]
one, c = torch.tensor(1.0), torch.tensor(0.9999)
def t(fn, n=101):
    fn(); s=[]
    for _ in range(n):
        a=time.perf_counter(); fn(); s.append((time.perf_counter()-a)*1e6)
    return statistics.median(s)
rows = []
for isa in (["widest", "avx512"] if len(sys.argv) < 3 else sys.argv[2].split(",")):
    os.environ["GRADSTATS_NATIVE_ISA"] = isa
    r = []
    for _ in range(5):
        ff = t(lambda: native.cpu_scale_(f, c)) - t(lambda: native.cpu_scale_(f, one))
        bb = t(lambda: native.cpu_scale_(b, c)) - t(lambda: native.cpu_scale_(b, one))
        r.append(bb / ff)
    print(w, isa, f"fp32 loop {ff:.0f} us, bf16 loop {bb:.0f} us, ratios {[round(x,3) for x in r]}")
