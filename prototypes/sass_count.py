"""Count SASS instructions per element in the stats kernel's hot loop, without a GPU.

Usage (from the repository root, any triton venv):
    TRITON_CACHE_DIR=/tmp/tc-$VER PYTHONPATH=. python prototypes/sass_count.py VARIANT[,VARIANT] [CC]

VARIANT: "histogram" (tl.histogram) or "counters" (per-thread shared-memory counters). For each formulation x dtype (fp32, bf16) x bins (64, 1024)
it compiles ``_stats_kernel`` with the GPU launch config through triton's real NVIDIA
backend, runs ptxas -v for registers/spills and cuobjdump for SASS, and prints one JSON
line: loop instructions / elements per thread per iteration, opcode histogram.
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gradstats.kernels import stats as K  # noqa: E402
from gradstats.launch_config import GPU_CONFIGS  # noqa: E402

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def sass_loops(text):
    insns, labels, pending = [], {}, []
    for line in text.splitlines():
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = INSN.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            insns.append((addr, m.group(3), m.group(4)))
    found = []
    for addr, op, args in insns:
        if op.startswith("BRA"):
            m = re.search(r"(\.L_x_\d+)", args)
            h = re.match(r"\s*0x([0-9a-f]+)", args)
            start = labels.get(m.group(1)) if m else (int(h.group(1), 16) if h else None)
            if start is not None and start < addr:
                found.append([x for x in insns if start <= x[0] <= addr])
    return found


def ptxas(ptx, cc, wd):
    from triton.backends.nvidia.compiler import get_ptxas
    src = os.path.join(wd, "k.ptx")
    open(src, "w").write(ptx)
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    out = subprocess.run([get_ptxas(cc).path if hasattr(get_ptxas(cc), "path") else get_ptxas(cc),
                          "-v", f"--gpu-name={arch}", src, "-o", os.path.join(wd, "k.o")],
                         capture_output=True, text=True)
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return (int(regs.group(1)) if regs else None,
            (int(spill.group(1)), int(spill.group(2))) if spill else None,
            int(smem.group(1)) if smem else 0)


def cuobjdump(cubin, wd):
    path = os.path.join(wd, "k.cubin")
    open(path, "wb").write(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout


def counter_sets(variant, hist_bins, threads):
    if variant == "histogram":
        return 0
    return min(threads, 8192 // hist_bins)


def compile_stats(dtype, num_bins, cc, min_exp=None, variant="counters"):
    if min_exp is None:
        min_exp = int(os.environ.get("MIN_EXP", "-40"))
    cfg = GPU_CONFIGS[dtype]
    tdt = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
           torch.float64: tl.float64}[dtype]
    is64 = dtype == torch.float64
    ce = dict(DTYPE=tdt, ACC_DTYPE=tl.float64 if is64 else tl.float32, NORM_KIND=2, CHUNK=cfg.chunk, BLOCK=cfg.block,
              ALIGNED=True, HISTOGRAM=True, NUM_BINS=num_bins,
              HIST_BINS=triton.next_power_of_2(max(num_bins, 2)), MIN_EXP=min_exp,
              EXP_SHIFT=52 if is64 else 23, EXP_BIAS=1023 if is64 else 127,
              EXACT_SUBNORMALS=min_exp < (-1022 if is64 else -126))
    ce["COUNTER_SETS"] = counter_sets(variant, ce["HIST_BINS"], 32 * cfg.num_warps)
    fn = K._stats_kernel
    ce = {k: v for k, v in ce.items() if k in fn.arg_names}
    sig = {n: ("constexpr" if n in ce else "*i64") for n in fn.arg_names}
    sig.update(partial_power_ptr="*fp64" if is64 else "*fp32", partial_nonfinite_ptr="*i32", p="fp32")
    aligned = ("ptrs_ptr", "slots_ptr", "partial_power_ptr", "partial_nonfinite_ptr", "hist_ptr")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    k = triton.compile(ASTSource(fn, sig, ce, attrs), target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": cfg.num_warps})
    return k, cfg


def measure(variant, dtype, num_bins, cc, dump=None):
    k, cfg = compile_stats(dtype, num_bins, cc, variant=variant)
    per_thread = cfg.block // (32 * cfg.num_warps)
    with tempfile.TemporaryDirectory() as wd:
        regs, spill, static_smem = ptxas(k.asm["ptx"], cc, wd)
        sass = cuobjdump(k.asm["cubin"], wd)
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, f"{variant}-{triton.__version__}-{str(dtype)[6:]}-{num_bins}")
        open(stem + ".sass", "w").write(sass)
        open(stem + ".ptx", "w").write(k.asm["ptx"])
        open(stem + ".ttgir", "w").write(k.asm["ttgir"])
    loops = sass_loops(sass)
    # The hot loop is the one with the most wide loads.
    hot = max(loops, key=lambda body: sum(op.startswith("LDG") for _, op, _ in body), default=[])
    ops = collections.Counter(op.split(".")[0] for _, op, _ in hot)
    return {
        "variant": variant, "triton": triton.__version__, "cc": cc, "dtype": str(dtype)[6:],
        "bins": num_bins, "loop_insns": len(hot),
        "sass_per_elem": round(len(hot) / per_thread, 1) if hot else None,
        "regs": regs, "spill": spill, "smem": k.metadata.shared + static_smem,
        "bar": ops.get("BAR", 0), "n_loops": len(loops), "total_insns": sass.count(" ;"),
        "by_op": dict(ops.most_common(14)),
    }


if __name__ == "__main__":
    variants = sys.argv[1].split(",")
    cc = int(sys.argv[2]) if len(sys.argv) > 2 else 90
    dtypes = [torch.float32, torch.bfloat16]
    bins = [int(b) for b in os.environ.get("BINS", "64").split(",")]
    if os.environ.get("DTYPES"):
        dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                   "fp64": torch.float64}[d]
                  for d in os.environ["DTYPES"].split(",")]
    for v in variants:
        for dt in dtypes:
            for nb in bins:
                try:
                    print(json.dumps(measure(v, dt, nb, cc, os.environ.get("DUMP"))), flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(json.dumps({"variant": v, "dtype": str(dt), "bins": nb,
                                      "error": f"{type(exc).__name__}: {str(exc)[:800]}"}), flush=True)
