"""CPU gradient clipping on the native C++ layer against torch.nn.utils, paired.

For each workload and dtype, three pairs measured in the same run (timing.paired_ms), each
gradstats (``GRADSTATS_BACKEND=native``: statistics and scaling in ``gradstats._C``)
against torch.nn.utils on its own copy of the same gradients:

- ``clip_grad_norm_``, no clipping needed (``max_norm`` 1e9): gradstats reads every
  gradient once and writes none; torch computes per-tensor norms, then multiplies every
  gradient by the clamped coefficient 1.0;
- ``clip_grad_norm_``, clipping: every call's ``max_norm`` is 0.8x the previous one, so the
  coefficient stays below 1 (about 0.8) in every dtype and every call scales;
- ``clip_grads_with_norm_`` (the scale alone, coefficient 0.95 from a fixed total norm),
  with its bandwidth: bytes read and written per millisecond.

Then, per workload, bfloat16 against float32 per byte (skipped with ``--no-per-byte``):
gradstats on bf16 gradients twice as long in their first dimension (the same tensors, the
same bytes) against gradstats on the float32 ones, paired the same way, for the read alone
(no clipping needed) and the scale. A ratio at or below 1 means bf16 is read no slower per
byte than fp32; timing the two dtypes in separate rows of the table above leaves that to the
machine's drift between rows, which on a shared VM is as large as the difference.

    python -m benchmarks.native_clip [--workloads gpt2-small,many-small] [--dtypes fp32,bf16]
        [--threads N] [--no-per-byte] [--out benchmarks/results/native-cpu-clip.md]

On a CPU shared with other jobs, compare with --threads 1 as well: torch opens one
parallel region per gradient (gradstats one per call), and each region waits for every
thread, so a busy core slows torch's many regions far more than gradstats' one.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

import gradstats
from benchmarks.timing import paired_ms
from benchmarks.workloads import WORKLOADS, make_params
from gradstats import backend, native

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
NO_CLIP_MAX_NORM = 1e9
SHRINK = 0.8  # clipping case: each call's max_norm over the previous call's
SCALE_COEF = 0.95  # scale-only case: max_norm / (total_norm + 1e-6)


class ShrinkingClip:
    """``clip(params, max_norm)`` with a max_norm that shrinks by SHRINK per call, starting
    below the gradients' norm: every call clips (coefficient ~0.8, never rounded to 1)."""

    def __init__(self, clip, params, start_norm: float):
        self.clip, self.params, self.max_norm = clip, params, start_norm

    def __call__(self):
        self.max_norm *= SHRINK
        self.clip(self.params, self.max_norm)


def _copy(params):
    twins = []
    for param in params:
        twin = torch.nn.Parameter(param.detach().clone())
        twin.grad = param.grad.clone()
        twins.append(twin)
    return twins


def _native(fn):
    def run():
        os.environ[backend.BACKEND_ENV] = "native"
        fn()
    return run


def measure(workload: str, dtype_name: str) -> list[str]:
    dtype = DTYPES[dtype_name]
    ours = make_params(WORKLOADS[workload](), dtype, torch.device("cpu"))
    theirs = _copy(ours)
    n_bytes = sum(p.grad.numel() * p.grad.element_size() for p in ours)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in ours]))
    cpu = torch.device("cpu")
    rows = []

    pair = paired_ms(_native(lambda: gradstats.clip_grad_norm_(ours, NO_CLIP_MAX_NORM)),
                     lambda: torch.nn.utils.clip_grad_norm_(theirs, NO_CLIP_MAX_NORM), cpu)
    rows.append(("clip_grad_norm_, no clipping needed", pair, None))

    pair = paired_ms(_native(ShrinkingClip(gradstats.clip_grad_norm_, ours, norm)),
                     ShrinkingClip(torch.nn.utils.clip_grad_norm_, theirs, norm), cpu)
    rows.append(("clip_grad_norm_, clipping", pair, None))

    # A fixed total norm: max_norm / (total + 1e-6) = SCALE_COEF, in float64 for exactness.
    total = torch.tensor(1.0 / SCALE_COEF, dtype=torch.float64) - 1e-6
    pair = paired_ms(_native(lambda: gradstats.clip_grads_with_norm_(ours, 1.0, total)),
                     lambda: torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total), cpu)
    rows.append(("clip_grads_with_norm_ (scale only)", pair, 2 * n_bytes))

    lines = []
    for case, pair, moved in rows:
        bandwidth = (f"{moved / pair.ours_ms / 1e6:.1f} / {moved / pair.baseline_ms / 1e6:.1f}"
                     if moved else "")
        lines.append(f"| {workload} | {dtype_name} | {case} | {pair.ours_ms:.2f} | "
                     f"{pair.baseline_ms:.2f} | {pair.ratio:.3f} | {pair.spread:.2f} | "
                     f"{pair.rounds} | {bandwidth} |")
    return lines


def _doubled(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape with its first dimension doubled: as many bf16 bytes as fp32 ``shape``."""
    return (2 * shape[0], *shape[1:])


def measure_per_byte(workload: str) -> list[str]:
    """gradstats on bf16 against gradstats on fp32, the same bytes, paired."""
    shapes = WORKLOADS[workload]()
    fp32 = make_params(shapes, torch.float32, torch.device("cpu"))
    bf16 = make_params([_doubled(shape) for shape in shapes], torch.bfloat16,
                       torch.device("cpu"))
    n_bytes = sum(p.grad.numel() * p.grad.element_size() for p in fp32)
    assert n_bytes == sum(p.grad.numel() * p.grad.element_size() for p in bf16)
    cpu = torch.device("cpu")
    total = torch.tensor(1.0 / SCALE_COEF, dtype=torch.float64) - 1e-6
    cases = [
        ("clip_grad_norm_, no clipping needed", n_bytes,
         lambda params: lambda: gradstats.clip_grad_norm_(params, NO_CLIP_MAX_NORM)),
        ("clip_grads_with_norm_ (scale only)", 2 * n_bytes,
         lambda params: lambda: gradstats.clip_grads_with_norm_(params, 1.0, total)),
    ]
    lines = []
    for case, moved, call in cases:
        pair = paired_ms(_native(call(bf16)), _native(call(fp32)), cpu)
        lines.append(f"| {workload} | {case} | {n_bytes / 1e6:.4g} | {pair.ours_ms:.2f} | "
                     f"{pair.baseline_ms:.2f} | {pair.ratio:.3f} | {pair.spread:.2f} | "
                     f"{pair.rounds} | {moved / pair.ours_ms / 1e6:.1f} / "
                     f"{moved / pair.baseline_ms / 1e6:.1f} |")
    return lines


PER_BYTE_HEADER = [
    "",
    "## bf16 against fp32, per byte (both gradstats, the same bytes, paired)",
    "",
    "bf16 gradients have twice the first dimension of the fp32 ones; ratio: bf16 time / "
    "fp32 time, median of per-round ratios (<= 1: bf16 no slower per byte).",
    "",
    "| workload | case | MB | bf16 ms | fp32 ms | ratio | spread | rounds | GB/s bf16 / fp32 |",
    "|---|---|---|---|---|---|---|---|---|",
]


def header(argv: list[str]) -> list[str]:
    import triton  # noqa: F401  (its version, for the record)

    return [
        "# CPU clipping: native C++ (gradstats._C) against torch.nn.utils",
        "",
        f"- device: CPU {platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads, shared with other jobs",
        f"- torch: {torch.__version__}, triton {sys.modules['triton'].__version__}, "
        f"python {platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: python -m benchmarks.native_clip {' '.join(argv)}".rstrip(),
        "- ratio: median of per-round ratios, gradstats / torch, timed in alternation "
        "(benchmarks/timing.py paired_ms); spread: their interquartile range over the median.",
        "- GB/s: bytes read + written by the scale, gradstats / torch.",
        "",
        "| workload | dtype | case | gradstats ms | torch ms | ratio | spread | rounds | GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="gpt2-small,many-small")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads first (default: torch's choice)")
    parser.add_argument("--no-per-byte", dest="per_byte", action="store_false",
                        help="skip the bf16-against-fp32 pairs")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"no native layer: {native.unavailable_reason()}")
    saved = os.environ.get(backend.BACKEND_ENV)
    lines = header(argv)
    print("\n".join(lines), flush=True)
    try:
        for workload in args.workloads.split(","):
            for dtype_name in args.dtypes.split(","):
                for line in measure(workload, dtype_name):
                    print(line, flush=True)
                    lines.append(line)
        if args.per_byte:
            print("\n".join(PER_BYTE_HEADER), flush=True)
            lines += PER_BYTE_HEADER
            for workload in args.workloads.split(","):
                for line in measure_per_byte(workload):
                    print(line, flush=True)
                    lines.append(line)
    finally:
        if saved is None:
            os.environ.pop(backend.BACKEND_ENV, None)
        else:
            os.environ[backend.BACKEND_ENV] = saved
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
