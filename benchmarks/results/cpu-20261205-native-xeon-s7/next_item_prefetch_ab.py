"""Whole ``cpu_scale_`` calls on 4,500 small tensors with the next-item fetch on and off,
alternating per call, 300 pairs. Needs a temporary build (not kept) in which run_items
fetches only when the environment variable EXP_NO_NEXT is unset (read once per call).
"""
import os
import statistics
import sys
import time

import torch

torch.set_num_threads(1)
from benchmarks.workloads import WORKLOADS, make_params
from gradstats import native

shapes = WORKLOADS[sys.argv[1] if len(sys.argv) > 1 else "many-small"]()
f = [p.grad for p in make_params(shapes, torch.float32, torch.device("cpu"))]
b = [p.grad for p in make_params([(2*s[0], *s[1:]) for s in shapes], torch.bfloat16, torch.device("cpu"))]
c = torch.tensor(0.9999)
def once(fn):
    a = time.perf_counter(); fn(); return (time.perf_counter() - a) * 1e6
for name, g in (("fp32", f), ("bf16", b)):
    ratios, offs, ons = [], [], []
    for _ in range(300):
        os.environ["EXP_NO_NEXT"] = "1"; off = once(lambda: native.cpu_scale_(g, c))
        os.environ.pop("EXP_NO_NEXT", None); on = once(lambda: native.cpu_scale_(g, c))
        ratios.append(on / off); offs.append(off); ons.append(on)
    q = statistics.quantiles(ratios, n=4)
    print(name, f"off {statistics.median(offs):.0f} on {statistics.median(ons):.0f} us, on/off {statistics.median(ratios):.3f} (IQR {q[0]:.3f}-{q[2]:.3f})")
