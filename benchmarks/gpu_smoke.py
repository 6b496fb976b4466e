"""First look on a GPU: fused clip/stats against torch.nn.utils on two workloads."""
import torch
import triton.testing

import gradstats
from benchmarks.workloads import WORKLOADS, make_params


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


for name in ("gpt2-small", "decoder-1b", "many-small"):
    for dtype in (torch.float32, torch.bfloat16):
        params = make_params(WORKLOADS[name](), dtype, "cuda")
        grads = [p.grad for p in params]
        ref = torch.nn.utils.get_total_norm(grads)
        ours = gradstats.get_total_norm(grads)
        stats = gradstats.grad_stats(params)
        hist_ok = bool((stats.hist.sum(1) == stats.numel).all())
        t_torch = bench(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9))
        t_ours = bench(lambda: gradstats.fused_clip_grad_norm_(params, 1e9))
        t_torch_clip = bench(lambda: torch.nn.utils.clip_grad_norm_(params, 1e-9))
        t_ours_clip = bench(lambda: gradstats.fused_clip_grad_norm_(params, 1e-9))
        t_stats = bench(lambda: gradstats.grad_stats(params, histogram=False))
        t_hist = bench(lambda: gradstats.grad_stats(params))
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        big = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
        t_sum = bench(lambda: big.sum())
        print(f"{name:11s} {str(dtype):15s} norm torch={ref.item():.6g} ours={ours.item():.6g} "
              f"hist_ok={hist_ok} | clip no-op torch {t_torch:.3f} ms ours {t_ours:.3f} "
              f"({t_ours / t_torch:.2f}x) | clipping torch {t_torch_clip:.3f} ours {t_ours_clip:.3f} "
              f"({t_ours_clip / t_torch_clip:.2f}x) | stats {t_stats:.3f} ({t_sum / t_stats:.2f} of floor) "
              f"| stats+hist {t_hist:.3f} ({t_sum / t_hist:.2f} of floor) | floor {t_sum:.3f}", flush=True)
        del params, grads, big
        torch.cuda.empty_cache()
