"""Compile every gradstats kernel specialization for sm_80 / sm_90 without a GPU, and read
the facts the kernels' speed rests on from the compiled artefacts.

    python -m benchmarks.gpu_compile --cc 90 [--scenarios hot-loops] [--out result.json]

runs gradstats' public API (:mod:`benchmarks.launch_scenarios`) on CPU tensors with the
Triton backend and the GPU launch configs forced, through a fake CUDA driver
(:mod:`benchmarks.fake_cuda`): each launch compiles the exact specialization a GPU launch
would, and nothing runs. It prints (or writes) JSON: per specialization its constexprs,
compile error if any, registers, local memory, the hot loop's loads and instructions, and the
masked loads outside it.

The compile needs a process of its own: the Triton interpreter (``TRITON_INTERPRET=1``,
set by the test suite) is chosen when triton is imported. :func:`compile_in_subprocesses`
runs one process per target, side by side. tests/test_gpu_compile.py is the CI gate built
on this; benchmarks/instructions.py prints the hot-loop table.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS = (80, 90)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}  # by the DTYPE constexpr


def toolchain_available() -> str | None:
    """None when triton's NVIDIA backend and its bundled ptxas and cuobjdump are present,
    else why not. Safe to call with the interpreter on: nothing here compiles."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton's NVIDIA backend is not importable: {exc}"
    try:
        for cc in TARGETS:
            get_ptxas(cc).path
        knobs.nvidia.cuobjdump.path
    except Exception as exc:  # noqa: BLE001 - the knob raises when the binary is missing
        return f"triton's bundled CUDA tools are missing: {exc}"
    return None


def _kernel_sources() -> list[Path]:
    spec = importlib.util.find_spec("gradstats.kernels")
    return sorted(Path(spec.origin).parent.glob("*.py"))


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Attribute) and target.attr == "jit") or (
        isinstance(target, ast.Name) and target.id == "jit")


def jit_functions() -> dict[str, ast.FunctionDef]:
    """Every @triton.jit function in gradstats/kernels, by name, read from the source (so it
    works whether or not triton is in interpreter mode)."""
    found = {}
    for path in _kernel_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and any(map(_is_triton_jit, node.decorator_list)):
                found[node.name] = node
    return found


def launch_targets() -> list[str]:
    """The @triton.jit functions host code launches: every one no other kernel calls (the
    rest are helpers, inlined into the kernels that call them)."""
    functions = jit_functions()
    called = set()
    for function in functions.values():
        for node in ast.walk(function):
            if isinstance(node, ast.Call):
                callee = node.func
                called.add(callee.id if isinstance(callee, ast.Name) else
                           getattr(callee, "attr", None))
    return sorted(name for name in functions if name not in called)


def constexpr_names(kernel: str) -> list[str]:
    """The arguments of ``kernel`` annotated ``tl.constexpr``."""
    arguments = jit_functions()[kernel].args.args
    return [a.arg for a in arguments if a.annotation is not None
            and ast.unparse(a.annotation).endswith("constexpr")]


def _replace_everywhere(original, replacement, undo: list) -> None:
    """Point every gradstats module's binding of ``original`` at ``replacement``: modules
    import these functions by name, so patching one module would miss the others."""
    for name, module in list(sys.modules.items()):
        if name == "gradstats" or name.startswith("gradstats."):
            for attribute, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attribute, replacement)
                    undo.append((module, attribute, original))


@contextlib.contextmanager
def gpu_route(shared_counters: bool = True):
    """CPU tensors take the Triton backend with the launch configs of a CUDA device.

    gradstats sends CPU tensors to Triton only in the interpreter, with the interpreter's
    launch config and tl.histogram; a GPU launch differs in all three, so each decision is
    redirected. ``shared_counters=False`` keeps tl.histogram (the formulation the
    shared-memory counters replaced on GPUs), for comparison.
    """
    import torch

    from gradstats import backend, launch_config, worklist
    from gradstats.kernels import stats

    for path in _kernel_sources():  # loaded now, so their bindings are redirected too
        if path.stem != "__init__":
            importlib.import_module(f"gradstats.kernels.{path.stem}")
    undo: list = []
    original_config = launch_config.launch_config

    def gpu_config(dtype, device):
        return original_config(dtype, torch.device("cuda"))

    def triton_everywhere(device):
        return backend.Backend.TRITON

    original_counter_sets = stats._shared_counter_sets

    def gpu_counter_sets(device, config, hist_bins):
        if not shared_counters:
            return 0
        return original_counter_sets(torch.device("cuda"), config, hist_bins)

    _replace_everywhere(backend.choose_backend, triton_everywhere, undo)
    _replace_everywhere(original_config, gpu_config, undo)
    _replace_everywhere(original_counter_sets, gpu_counter_sets, undo)
    worklist.clear_plan_cache()
    try:
        yield
    finally:
        for module, attribute, original in reversed(undo):
            setattr(module, attribute, original)
        worklist.clear_plan_cache()


def _element_bytes(constexprs: dict) -> int | None:
    return ELEMENT_BYTES.get(constexprs.get("DTYPE", ""))


def describe(spec) -> dict:
    """A compiled specialization as JSON: what was compiled and what its artefacts say."""
    from benchmarks import cubin_facts

    record = {"kernel": spec.kernel, "constexprs": spec.constexprs,
              "signature": spec.signature, "aligned_args": spec.aligned_args,
              "num_warps": spec.num_warps,
              "seconds": round(spec.seconds, 2), "error": spec.error}
    if not spec.ok:
        return record
    usage, sass = cubin_facts.cubin_facts(spec.asm["cubin"])
    record.update(registers=usage.registers, stack_bytes=usage.stack_bytes,
                  local_bytes=usage.local_bytes, shared_bytes=usage.shared_bytes,
                  cubin_elf_abi=cubin_facts.cubin_elf_abi(spec.asm["cubin"]),
                  **cubin_facts.ptx_header(spec.asm["ptx"]))
    loop = cubin_facts.hot_loop(sass)
    if loop is not None:
        element_bytes = _element_bytes(spec.constexprs)
        record["hot_loop"] = {
            "instructions": loop.instructions, "loads": loop.loads, "stores": loop.stores,
            "opcodes": loop.opcodes, "all_loads_128_bit": loop.all_loads_128_bit,
            "elements": loop.elements(element_bytes) if element_bytes else None,
            "instructions_per_element": (round(loop.instructions_per_element(element_bytes), 2)
                                         if element_bytes else None),
            "all_stores_128_bit": loop.all_stores_128_bit}
    record["masked_loads_outside_loops"] = cubin_facts.masked_loads_outside_loops(sass)
    return record


def compile_target(cc: int, scenario_set: str = "all", shared_counters: bool = True) -> dict:
    """Run the scenarios for ``sm_<cc>`` in this process (no interpreter) and describe every
    specialization they compiled, and which scenario compiled it first (a scenario that
    only reuses kernels compiled before it compiles nothing)."""
    import triton
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    from benchmarks import launch_scenarios
    from benchmarks.fake_cuda import compile_only

    chosen = (launch_scenarios.scenarios() if scenario_set == "all"
              else launch_scenarios.hot_loop_scenarios())
    python_errors, compiled_by = [], {}
    start = time.perf_counter()
    with (warnings.catch_warnings(), compile_only(cc) as recorder,
          gpu_route(shared_counters)):
        warnings.simplefilter("ignore")  # garbage outputs (nothing ran) trip NaN alarms
        for name, call in chosen:
            compiled_before = len(recorder.compiled)
            try:
                call()
            except Exception:  # noqa: BLE001 - reported; the other scenarios still run
                python_errors.append({"scenario": name, "error": traceback.format_exc()[-2000:]})
            compiled_by[name] = list(range(compiled_before, len(recorder.compiled)))
    compile_seconds = time.perf_counter() - start
    ptxas = get_ptxas(cc)
    return {
        "cc": cc, "triton": triton.__version__,
        "ptxas": {"binary": os.path.basename(ptxas.path), "cuda": ptxas.version},
        "cuobjdump_cuda": knobs.nvidia.cuobjdump.version,
        "launch_targets": launch_targets(),
        "launches": recorder.launches, "launch_errors": recorder.launch_errors,
        "python_errors": python_errors, "compile_seconds": round(compile_seconds, 1),
        "shared_counters": shared_counters,
        "compiled_by": compiled_by,  # scenario -> indices into "specializations"
        "specializations": [describe(spec) for spec in recorder.compiled],
    }


def compile_in_subprocesses(targets=TARGETS, scenario_set: str = "all",
                            cache_dir: str | None = None, timeout: float = 1800,
                            shared_counters: bool = True) -> dict[int, dict]:
    """:func:`compile_target` for each target, one process each, run side by side.

    ``cache_dir``: triton's kernel cache; by default a fresh one per call, so every
    specialization is really compiled (a warm cache would hide compile errors from a
    changed toolchain less than it hides time, but honest is simpler).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="gradstats-gpu-compile-") as scratch:
        processes = {}
        for cc in targets:
            env_cc = dict(env, TRITON_CACHE_DIR=cache_dir or os.path.join(scratch, f"cache{cc}"))
            out = os.path.join(scratch, f"sm{cc}.json")
            processes[cc] = (out, subprocess.Popen(
                [sys.executable, "-m", "benchmarks.gpu_compile", "--cc", str(cc),
                 "--scenarios", scenario_set, "--out", out]
                + ([] if shared_counters else ["--tl-histogram"]),
                cwd=REPO_ROOT, env=env_cc, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
        results = {}
        try:
            for cc, (out, process) in processes.items():
                output, _ = process.communicate(timeout=timeout)
                if process.returncode != 0:
                    raise RuntimeError(f"compiling for sm_{cc} failed "
                                       f"(exit {process.returncode}):\n" + output[-4000:])
                with open(out) as file:
                    results[cc] = json.load(file)
        finally:
            for _, process in processes.values():
                if process.poll() is None:  # only after a failure or timeout
                    process.kill()
                    process.wait()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", type=int, required=True, help="compute capability, e.g. 90")
    parser.add_argument("--scenarios", choices=("all", "hot-loops"), default="all")
    parser.add_argument("--out", help="write the JSON here instead of stdout")
    parser.add_argument("--tl-histogram", action="store_true",
                        help="count the histogram with tl.histogram, not shared counters")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    result = json.dumps(compile_target(args.cc, args.scenarios, not args.tl_histogram),
                        indent=1)
    if args.out:
        Path(args.out).write_text(result)
    else:
        print(result)


if __name__ == "__main__":
    main()
