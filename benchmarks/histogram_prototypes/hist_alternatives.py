"""Histogram formulations not taken, as minimal fp32 kernels (a loop of BLOCK loads, the
sum of squares and the column math): relaxed global atomics per element, and tl.histogram
over a 2-D block. A measured data point behind benchmarks/results/stats-sass.md, not used
by the library. Usage, from the repository root (no GPU needed; prints SASS per element of
the loop for sm_90):

    python -m benchmarks.histogram_prototypes.hist_alternatives
"""
import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile for a GPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks import cubin_facts  # noqa: E402


@triton.jit
def _column(x):
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    tiniest = tl.full([], 1, tl.int32).to(tl.float32, bitcast=True)
    nonzero = tl.minimum(ax, tiniest).to(tl.int32, bitcast=True)
    column = tl.maximum((bits >> 23) - 86, nonzero)
    return tl.minimum(column, 63)


@triton.jit
def alternative_kernel(x_ptr, out_ptr, scratch_ptr, n,
                       BLOCK: tl.constexpr, SUB: tl.constexpr, KIND: tl.constexpr):
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


def main() -> None:
    for kind, name in ((1, "global-atomics-relaxed"), (2, "histogram-2d")):
        constexprs = dict(BLOCK=4096, SUB=8, KIND=kind)
        signature = dict(x_ptr="*fp32", out_ptr="*fp32", scratch_ptr="*i32", n="i32",
                         BLOCK="constexpr", SUB="constexpr", KIND="constexpr")
        attrs = {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
        try:
            kernel = triton.compile(ASTSource(alternative_kernel, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": 8, "enable_fp_fusion": True})
        except Exception as exc:  # noqa: BLE001 - a formulation the compiler rejects
            print(triton.__version__, name, "FAILS:",
                  str(exc).strip().splitlines()[-1][:200])
            continue
        usage, sass = cubin_facts.cubin_facts(kernel.asm["cubin"])
        loop = cubin_facts.hot_loop(sass)
        top = dict(sorted(loop.opcodes.items(), key=lambda item: -item[1])[:8])
        print(triton.__version__, name, "sass/elem", round(loop.instructions_per_element(4), 1),
              "regs", usage.registers, "spill", usage.stack_bytes + usage.local_bytes, top)


if __name__ == "__main__":
    main()
