"""Instruction counts of the statistics kernel's hot loop, without a GPU.

    python -m benchmarks.stats_sass [--cc 90] [--dtypes fp32,bf16] [--bins 64,1024]
                                    [--min-exp -40] [--formulation counters|histogram]

Compiles ``_stats_kernel`` with the GPU launch config (L2 norm, histogram on, 16-byte
aligned pointers) through triton's NVIDIA backend for sm_CC, which needs no GPU: TTGIR ->
PTX -> the ptxas that ships with triton. Prints one JSON line per case: SASS instructions
in the hot loop per element, the loop's opcodes, registers and spills (ptxas -v), shared
memory (triton's dynamic + static), barriers per iteration. ``--formulation histogram``
compiles the tl.histogram path (what the interpreter runs) in place of the shared-memory
counters, for comparison. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gradstats.kernels import stats as K
from gradstats.launch_config import GPU_CONFIGS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _INSN.finditer(sass)]


def hot_loop(sass: str) -> list[str]:
    """Opcodes of the loop (a backward branch) holding the most global loads."""
    insns = _instructions(sass)
    loops = []
    for addr, op, args in insns:
        target = re.match(r"\s*0x([0-9a-f]+)", args)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            loops.append([o for a, o, _ in insns if start <= a <= addr])
    return max(loops, key=lambda ops: sum(o.startswith("LDG") for o in ops), default=[])


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_usage(ptx: str, cc: int, workdir: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(cc)
    src = os.path.join(workdir, "kernel.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    out = subprocess.run([getattr(ptxas, "path", ptxas), "-v", f"--gpu-name={arch}", src,
                          "-o", os.path.join(workdir, "kernel.o")], capture_output=True, text=True)
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
            "static_smem": int(smem.group(1)) if smem else 0}


def _sass(cubin: bytes, workdir: str) -> str:
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True,
                          text=True, check=True).stdout


def compile_stats(dtype: torch.dtype, num_bins: int, min_exp: int, cc: int,
                  formulation: str = "counters"):
    config = GPU_CONFIGS[dtype]
    is_fp64 = dtype == torch.float64
    exp_shift, exp_bias, _ = K.FP64_LAYOUT if is_fp64 else K.FP32_LAYOUT
    hist_bins = triton.next_power_of_2(num_bins)
    counter_sets = (K._shared_counter_sets(torch.device("cuda"), config, hist_bins)
                    if formulation == "counters" else 0)
    constexprs = dict(
        DTYPE=K._TRITON_DTYPES[dtype], ACC_DTYPE=tl.float64 if is_fp64 else tl.float32,
        NORM_KIND=2, CHUNK=config.chunk, BLOCK=config.block, ALIGNED=True, HISTOGRAM=True,
        NUM_BINS=num_bins, HIST_BINS=hist_bins, MIN_EXP=min_exp, EXP_SHIFT=exp_shift,
        EXP_BIAS=exp_bias, EXACT_SUBNORMALS=min_exp < 1 - exp_bias, COUNTER_SETS=counter_sets)
    fn = K._stats_kernel
    signature = {name: "constexpr" if name in constexprs else "*i64" for name in fn.arg_names}
    signature.update(partial_power_ptr="*fp64" if is_fp64 else "*fp32",
                     partial_nonfinite_ptr="*i32", p="fp32")
    aligned = ("ptrs_ptr", "slots_ptr", "partial_power_ptr", "partial_nonfinite_ptr", "hist_ptr")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", cc, 32),
                            options={"num_warps": config.num_warps})
    return kernel, config


def measure(dtype: torch.dtype, num_bins: int, min_exp: int, cc: int,
            formulation: str = "counters") -> dict:
    kernel, config = compile_stats(dtype, num_bins, min_exp, cc, formulation)
    per_thread = config.block // (32 * config.num_warps)  # elements per thread per iteration
    with tempfile.TemporaryDirectory() as workdir:
        usage = _ptxas_usage(kernel.asm["ptx"], cc, workdir)
        loop = hot_loop(_sass(kernel.asm["cubin"], workdir))
    ops = collections.Counter(op.split(".")[0] for op in loop)
    return {
        "formulation": formulation, "triton": triton.__version__, "sm": cc,
        "dtype": str(dtype).removeprefix("torch."), "bins": num_bins, "min_exp": min_exp,
        "sass_per_elem": round(len(loop) / per_thread, 1), "loop_insns": len(loop),
        "elems_per_thread": per_thread, "regs": usage["regs"],
        "spill_bytes": usage["spill_bytes"],
        "smem_bytes": kernel.metadata.shared + usage["static_smem"],
        "barriers_per_iter": ops["BAR"], "loop_ops": dict(ops.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", type=int, default=90)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--bins", default="64")
    parser.add_argument("--min-exp", type=int, default=-40)
    parser.add_argument("--formulation", default="counters", choices=["counters", "histogram"])
    args = parser.parse_args()
    for name in args.dtypes.split(","):
        for num_bins in map(int, args.bins.split(",")):
            print(json.dumps(measure(DTYPES[name], num_bins, args.min_exp, args.cc,
                                     args.formulation)), flush=True)


if __name__ == "__main__":
    main()
