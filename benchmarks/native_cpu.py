"""The CPU statistics pass before and after the native C++ layer, against one plain sum.

For each workload and dtype, three pairs measured in the same run (timing.paired_ms):
native / sum, reference / sum, native / reference, where "sum" is one ``sum()`` over a
flat buffer holding as many bytes as all the gradients (the cost of reading them once),
"reference" the PyTorch twin (``GRADSTATS_BACKEND=torch``) and "native" ``gradstats._C``
(``GRADSTATS_BACKEND=native``).

    python -m benchmarks.native_cpu [--workloads gpt2-small] [--dtypes fp32,bf16]
"""
from __future__ import annotations

import argparse
import os

import torch

import gradstats
from benchmarks.timing import paired_ms
from benchmarks.workloads import WORKLOADS, make_params
from gradstats import backend, native

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


def on_backend(name: str, fn):
    """``fn`` run with ``GRADSTATS_BACKEND=name`` (read on every call)."""
    def run():
        os.environ[backend.BACKEND_ENV] = name
        fn()
    return run


def measure(workload: str, dtype_name: str) -> list[str]:
    dtype = DTYPES[dtype_name]
    params = make_params(WORKLOADS[workload](), dtype, torch.device("cpu"))
    numel = sum(p.grad.numel() for p in params)
    flat = torch.randn(numel).to(dtype)
    plain_sum = lambda: flat.sum()  # noqa: E731
    lines = []
    for case, histogram in (("stats + histogram", True), ("stats only", False)):
        call = lambda: gradstats.grad_stats(params, histogram=histogram)  # noqa: E731
        ours, reference = on_backend("native", call), on_backend("torch", call)
        vs_sum = paired_ms(ours, plain_sum, flat.device)
        ref_vs_sum = paired_ms(reference, plain_sum, flat.device)
        vs_ref = paired_ms(ours, reference, flat.device)
        lines.append(
            f"| {workload} | {dtype_name} | {case} | {vs_sum.ours_ms:.1f} | "
            f"{ref_vs_sum.ours_ms:.1f} | {vs_sum.baseline_ms:.1f} | {vs_sum.ratio:.2f}x | "
            f"{ref_vs_sum.ratio:.2f}x | {vs_ref.ratio:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="gpt2-small")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args(argv)
    if not native.available():
        raise SystemExit(f"no native layer: {native.unavailable_reason()}")
    saved = os.environ.get(backend.BACKEND_ENV)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| workload | dtype | case | native ms | reference ms | sum ms | native / sum "
          "| reference / sum | native / reference |")
    print("|---|---|---|---|---|---|---|---|---|")
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


if __name__ == "__main__":
    main()
