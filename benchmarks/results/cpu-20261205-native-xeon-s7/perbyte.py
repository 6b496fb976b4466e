"""bf16 against fp32 per byte, paired in one process (this tree's gradstats), one thread.

Run from a source tree's root: PYTHONPATH=. taskset -c 1 python perbyte.py read,scale
"""
import os
import sys

os.environ["GRADSTATS_BACKEND"] = "native"
import torch

torch.set_num_threads(1)
import gradstats
from benchmarks.timing import paired_ms
from benchmarks.workloads import WORKLOADS, make_params

cpu = torch.device("cpu")
cases = sys.argv[1].split(",") if len(sys.argv) > 1 else ["read", "scale"]
workloads = sys.argv[2].split(",") if len(sys.argv) > 2 else ["gpt2-small", "many-small"]
total = torch.tensor(1.0 / 0.95, dtype=torch.float64) - 1e-6
for w in workloads:
    shapes = WORKLOADS[w]()
    fp32 = make_params(shapes, torch.float32, cpu)
    bf16 = make_params([(2 * s[0], *s[1:]) for s in shapes], torch.bfloat16, cpu)
    for case in cases:
        if case == "read":
            call = lambda ps: (lambda: gradstats.clip_grad_norm_(ps, 1e9))
        elif case == "scale":
            call = lambda ps: (lambda: gradstats.clip_grads_with_norm_(ps, 1.0, total))
        elif case == "stats":
            call = lambda ps: (lambda: gradstats.grad_stats(ps, histogram=False))
        else:
            call = lambda ps: (lambda: gradstats.grad_stats(ps, histogram=True))
        pair = paired_ms(call(bf16), call(fp32), cpu)
        print(f"{w:11s} {case:6s} bf16 {pair.ours_ms:7.2f} fp32 {pair.baseline_ms:7.2f} ms "
              f"ratio {pair.ratio:.3f} ±{pair.spread:.2f}", flush=True)
