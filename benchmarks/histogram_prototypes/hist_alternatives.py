"""Histogram formulations not taken, as minimal fp32 kernels (a loop of BLOCK loads, the
sum of squares and the column math): relaxed global atomics per element, and tl.histogram
over a 2-D block. Usage, from the repository root: python prototypes/hist_alternatives.py
(no GPU needed; prints SASS per element of the loop for sm_90)."""
import collections
import os
import sys
import tempfile
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.getcwd())
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks import stats_sass as S


@triton.jit
def _column(x):
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    tiniest = tl.full([], 1, tl.int32).to(tl.float32, bitcast=True)
    nonzero = tl.minimum(ax, tiniest).to(tl.int32, bitcast=True)
    column = tl.maximum((bits >> 23) - 86, nonzero)
    return tl.minimum(column, 63)


@triton.jit
def alternative_kernel(x_ptr, out_ptr, scratch_ptr, n, BLOCK: tl.constexpr, SUB: tl.constexpr, KIND: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    hist = tl.zeros([64], tl.int32)
    base = x_ptr + tl.program_id(0) * 16384
    for off in range(0, 16384, BLOCK):
        x = tl.load(base + off + lanes)
        acc += x * x
        col = _column(x)
        if KIND == 1:  # (d) relaxed global atomics per element into a per-program row
            tl.atomic_add(scratch_ptr + tl.program_id(0) * 64 + col, 1, sem="relaxed")
        elif KIND == 2:  # 2-D histogram input, if supported
            hist += tl.histogram(tl.reshape(col, [SUB, BLOCK // SUB]), 64)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))
    tl.store(out_ptr + 1 + tl.arange(0, 64), hist.to(tl.float32))


for kind, name in ((1, "global-atomics-relaxed"), (2, "histogram-2d")):
    ce = dict(BLOCK=4096, SUB=8, KIND=kind)
    sig = dict(x_ptr="*fp32", out_ptr="*fp32", scratch_ptr="*i32", n="i32", BLOCK="constexpr", SUB="constexpr", KIND="constexpr")
    attrs = {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    try:
        k = triton.compile(ASTSource(alternative_kernel, sig, ce, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    except Exception as e:
        print(triton.__version__, name, "FAILS:", str(e).strip().splitlines()[-1][:200]); continue
    with tempfile.TemporaryDirectory() as wd:
        u = S._ptxas_usage(k.asm["ptx"], 90, wd); loop = S.hot_loop(S._sass(k.asm["cubin"], wd))
    ops = collections.Counter(o.split(".")[0] for o in loop)
    print(triton.__version__, name, "sass/elem", round(len(loop) / 16, 1), "regs", u["regs"], "spill", u["spill_bytes"], dict(ops.most_common(8)))
