"""Instructions per element of each kernel's hot loop, read from the SASS triton compiles
for sm_80 / sm_90 on this machine (no GPU needed).

    python -m benchmarks.instructions [--cc 90] [--out DIR] [--tl-histogram]

At memory speed an H100 has about 35-44 SASS instructions per fp32 element to spend and
18-22 per bf16 element (A100: about 38 and 19); the targets below leave room under that
for the histogram work (../shared/research/review-2/gpu-audit.md, section 2). A count is
not a timing, and shared-memory atomics that collide cost more than one issue slot each:
the table says whether a change moved the work, a GPU says whether it moved the time.

The histogram columns count, per loop iteration, shared atomics (the GPU histogram's
shared-memory counters: one per element), warp votes and barriers (what tl.histogram's
lowering costs). ``--tl-histogram`` compiles the histogram rows with tl.histogram instead
of the shared counters (the formulation compared in benchmarks/results/stats-sass.md) and
adds them as a second table.

Writes ``instructions-sm<cc>.md`` to ``--out`` (default
``benchmarks/results/instructions-triton<version>/``: the figures depend on the triton
version and target only, so a rerun replaces them rather than adding a dated folder).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import gradstats
from benchmarks import gpu_compile
from gradstats.norms import NormKind

RESULTS_ROOT = Path("benchmarks/results")
_GRAD_STATS_DEFAULTS = inspect.signature(gradstats.grad_stats).parameters
DEFAULT_NUM_BINS = str(_GRAD_STATS_DEFAULTS["num_bins"].default)
DEFAULT_MIN_EXP = str(_GRAD_STATS_DEFAULTS["min_exp"].default)
# Most SASS instructions per element in the hot loop: (norm, dtype, histogram) -> target.
TARGETS = {
    ("L2", "fp32", False): 8, ("L2", "bf16", False): 10,
    ("L2", "fp32", True): 25, ("L2", "bf16", True): 18,
}
SCHEDULER_THREADS_PER_SM = 2048  # an SM holds at most 2048 threads on sm_80 and sm_90
REGISTERS_PER_SM = 65536


@dataclass(frozen=True)
class Row:
    label: str
    kernel: str
    match: dict  # constexprs the specialization must have
    target: float | None = None


def rows(histogram_only: bool = False) -> list[Row]:
    """The hot loops in the table: histogram off or default bins (the kernels are the same
    for aligned and unaligned gradients)."""
    from gradstats.kernels.apply import _CLAMP, _SCALE

    update_ops = {str(_SCALE.value): "scale", str(_CLAMP.value): "clamp"}
    table = []
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        for histogram in (True,) if histogram_only else (False, True):
            match = {"DTYPE": dtype, "NORM_KIND": str(NormKind.L2.value),
                     "HISTOGRAM": str(histogram)}
            if histogram:
                match.update(NUM_BINS=DEFAULT_NUM_BINS, MIN_EXP=DEFAULT_MIN_EXP)
            shown = f"{DEFAULT_NUM_BINS} bins" if histogram else "off"
            table.append(Row(f"stats {dtype} L2, histogram {shown}", "_stats_kernel", match,
                             TARGETS.get(("L2", dtype, histogram))))
    if histogram_only:
        return table
    for kind in (NormKind.INF, NormKind.L1, NormKind.LP):
        table.append(Row(f"stats fp32 {kind.name}, histogram off", "_stats_kernel",
                         {"DTYPE": "fp32", "NORM_KIND": str(kind.value), "HISTOGRAM": "False"}))
    for op, name in update_ops.items():
        for dtype in ("fp32", "bf16"):
            table.append(Row(f"update {name} {dtype}", "_update_kernel",
                             {"DTYPE": dtype, "OP": op}))
    return table


def find(result: dict, row: Row) -> dict | None:
    for spec in result["specializations"]:
        if spec["kernel"] == row.kernel and all(
                spec["constexprs"].get(k) == v for k, v in row.match.items()):
            return spec
    return None


def ctas_per_sm(registers: int, threads: int) -> int:
    per_thread = -(-registers // 8) * 8  # registers are allocated in steps of 8
    return min(REGISTERS_PER_SM // (per_thread * threads), SCHEDULER_THREADS_PER_SM // threads)


def meets_target(spec: dict, row: Row) -> bool:
    return row.target is None or spec["hot_loop"]["instructions_per_element"] <= row.target


_HEADER = ["hot loop", "SASS instr/elem", "target", "", "registers", "CTAs/SM (registers)",
           "local memory B", "shared memory B", "128-bit loads", "loop loads",
           "loop instructions", "ATOMS / VOTE / BAR per iteration"]


def table(result: dict, histogram_only: bool = False) -> list[str]:
    """Markdown table lines for one target's compile result."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for row in rows(histogram_only):
        spec = find(result, row)
        if spec is None or spec.get("error") or not spec.get("hot_loop"):
            lines.append(f"| {row.label} | missing |" + " |" * (len(_HEADER) - 2))
            continue
        loop = spec["hot_loop"]
        verdict = "" if row.target is None else ("pass" if meets_target(spec, row) else "FAIL")
        loads = ", ".join(f"{n} x {op}" for op, n in sorted(loop["loads"].items()))
        histogram_work = " / ".join(str(loop["opcodes"].get(family, 0))
                                    for family in ("ATOMS", "VOTE", "BAR"))
        cells = [row.label, f"{loop['instructions_per_element']:.1f}",
                 "" if row.target is None else f"<= {row.target}", verdict,
                 spec["registers"], ctas_per_sm(spec["registers"], spec["num_warps"] * 32),
                 spec["stack_bytes"] + spec["local_bytes"], spec["shared_bytes"],
                 "yes" if loop["all_loads_128_bit"] else "no", loads, loop["instructions"],
                 histogram_work]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def report(result: dict, command: str, tl_histogram: dict | None = None) -> str:
    spec = result["specializations"][0] if result["specializations"] else {}
    header = [
        f"# Hot-loop instructions per element, sm_{result['cc']}, triton {result['triton']}",
        "",
        f"- target: sm_{result['cc']} (PTX `.target {spec.get('ptx_target', '?')}`, "
        f"PTX ISA {spec.get('ptx_isa', '?')}, cubin ELF ABI {spec.get('cubin_elf_abi', '?')}), "
        "compiled without a GPU through a fake driver",
        f"- assembler: triton's bundled `{result['ptxas']['binary']}` "
        f"(CUDA {result['ptxas']['cuda']}); SASS read with cuobjdump "
        f"(CUDA {result['cuobjdump_cuda']})",
        f"- python: {platform.python_version()}; torch: {torch.__version__}; date: "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`",
        "",
        "Instructions per element = SASS instructions in the loop body / elements its "
        "global loads bring in. GPU launch configs, 8 warps (256 threads) per CTA; one "
        "kernel for aligned and unaligned gradients (each chunk finds its 16-byte boundary). "
        "CTAs/SM counts registers only. Shared memory: per CTA as cuobjdump reports it "
        "(SHARED; the histogram's 32 KB of counters show there, triton's dynamic shared "
        "memory does not). ATOMS / VOTE / BAR: shared atomics, warp votes and barriers per "
        "loop iteration.",
        "",
    ]
    lines = header + table(result)
    if tl_histogram is not None:
        lines += ["", "## The histogram rows with tl.histogram (not used on GPUs)", "",
                  "The same kernels compiled with `COUNTER_SETS=0`: the formulation the "
                  "shared-memory counters replaced, and what the interpreter runs.", ""]
        lines += table(tl_histogram, histogram_only=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", type=int, action="append",
                        help="compute capability (repeatable); default 80 and 90")
    parser.add_argument("--out", type=Path, help="results folder")
    parser.add_argument("--tl-histogram", action="store_true",
                        help="add the histogram rows compiled with tl.histogram")
    args = parser.parse_args(argv)
    missing = gpu_compile.toolchain_available()
    if missing:
        sys.exit(missing)
    targets = tuple(args.cc or gpu_compile.TARGETS)
    results = gpu_compile.compile_in_subprocesses(targets, scenario_set="hot-loops")
    tl_results = (gpu_compile.compile_in_subprocesses(targets, scenario_set="hot-loops",
                                                      shared_counters=False)
                  if args.tl_histogram else {})
    command = "python -m benchmarks.instructions " + shlex.join(argv if argv is not None
                                                                else sys.argv[1:])
    out = args.out or RESULTS_ROOT / f"instructions-triton{results[targets[0]]['triton']}"
    out.mkdir(parents=True, exist_ok=True)
    for cc in targets:
        text = report(results[cc], command.strip(), tl_results.get(cc))
        (out / f"instructions-sm{cc}.md").write_text(text)
        print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
