"""Host (Python) time per call on the path a CUDA run takes, measured on a CPU.

    python -m benchmarks.host_overhead [--calls N] [--paths native,python] [--out DIR]
                                       [--note TEXT]

On a GPU the kernels of one call take 0.06-0.25 ms, so below a few hundred tensors a call
is bound by its Python work: unpacking the parameters, the checks, the plan-cache lookup,
the launch arguments. This script measures that work without a GPU. CPU tensors are sent
down the Triton backend's path (``dispatch.choose_backend`` answers ``TRITON``, the work
lists take the GPU launch configs), with every kernel launch replaced by a stub that does
nothing (the reduce stub zeroes the non-finite counts so the monitor sees a clean step).
The backend choice runs as for a CUDA device (its environment reads included), and the
native walk lists nothing for the CPU pass, as on CUDA gradients (where it gives the
listing up at the first one).

Counted: everything gradstats runs on the host per call, the gradient collection, the plan
key and cache lookup, the output allocations (CPU allocator), and the launchers' argument
handling up to the launch. Not counted: Triton's own launch path (the JIT binder, its
specialization key and cache lookup, about 6-12 us per launch, 4-5 launches per call; the
C launcher and ``cuLaunchKernelEx``, about 3-5 us each), the CUDA caching allocator (about
1-2 us more per allocation than the CPU one), and entering the device guard
(``torch.cuda.device``) around the launches: CPU tensors take no guard. So a GPU call costs
these figures plus roughly 40-90 us, whatever the tensor count.

Two host paths are timed, calls interleaved: ``native`` (``gradstats._C`` built: one C++
walk collects the gradients and builds the plan key, csrc/host_path.cpp) and ``python``
(the same library with ``native.host_path_available`` off, as without ``_C``: Python
reads every gradient, and ``gradstats.known_tensors`` recognises lists seen before). Plans
are warm (built by the first call). The plain cases pass the same gradient tensors every
call (training with ``zero_grad(set_to_none=False)``); the "new gradient objects" cases
give every parameter a new gradient object on the same memory before each call (untimed),
as ``zero_grad(set_to_none=True)`` with a steady allocator does.

Each figure is the median of ``--calls`` timed calls (``time.perf_counter``, garbage
collector on, as in training), after warm-up calls. Results go to a new folder
``benchmarks/results/cpu-<UTC date-time>/`` (or ``--out``) as ``host-overhead.md`` and
``.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import gradstats
from benchmarks.timing import new_results_dir
from benchmarks.workloads import gpt2_small_shapes, make_params, many_small_shapes
from gradstats import backend, dispatch, native, worklist
from gradstats.backend import Backend
from gradstats.launch_config import GPU_CONFIGS

RESULTS_ROOT = Path("benchmarks/results")
WORKLOADS = {
    "gpt2-small fp32 (148 tensors)": gpt2_small_shapes,
    "many-small fp32 (4,500 tensors)": many_small_shapes,
}
# Timed calls per workload (more for the fast one: its medians are shorter and noisier).
DEFAULT_CALLS = {"gpt2-small fp32 (148 tensors)": 400, "many-small fp32 (4,500 tensors)": 60}
WARMUP_CALLS = 3
# Host paths timed: the native one (gradstats._C built) and the pure-Python one.
HOST_PATHS = ("native", "python")


class _StubLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does
    nothing, or calls ``effect(args)``."""

    def __init__(self, effect=None):
        self.effect = effect

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        if self.effect is not None:
            self.effect(args)


_A_CUDA_DEVICE = torch.device("cuda")  # only its type is read: no CUDA call


def _choose_as_for_cuda(device: torch.device) -> Backend:
    """``choose_backend`` as a call on CUDA tensors runs it (its environment reads are
    host time too), answering Triton for the CPU tensors that stand in for CUDA ones."""
    try:
        backend.choose_backend(_A_CUDA_DEVICE)
    except RuntimeError:  # GRADSTATS_BACKEND=native (CPU only): its reads ran all the same
        pass
    return Backend.TRITON


_native_host_pass = native.host_pass


def _walk_as_for_cuda(items, take_grad, list_for_cpu_pass=False):
    """``native.host_pass`` as on CUDA gradients: no listing for the CPU pass (on CUDA the
    walk gives it up at the first gradient and walks on as without it; that costs a few
    vector reserves and one failed check, left out here)."""
    return _native_host_pass(items, take_grad)


def _zero_nonfinite(args) -> None:
    args[6].zero_()  # _reduce_chunks_kernel's nonfinite output: a clean step


@contextlib.contextmanager
def stubbed_gpu_path():
    """CPU tensors take the Triton backend's host path, launches stubbed (see above)."""
    from gradstats.kernels import apply, finalize, stats

    stubs = {
        (stats, "_stats_kernel"): _StubLaunch(),
        (stats, "_reduce_chunks_kernel"): _StubLaunch(_zero_nonfinite),
        (finalize, "_finalize_kernel"): _StubLaunch(),
        (apply, "_update_kernel"): _StubLaunch(),
        (dispatch, "choose_backend"): _choose_as_for_cuda,
        (native, "host_pass"): _walk_as_for_cuda,
        (worklist, "launch_config"): lambda dtype, device: GPU_CONFIGS[dtype],
    }
    saved = {place: getattr(*place) for place in stubs}
    try:
        for (module, name), stub in stubs.items():
            setattr(module, name, stub)
        worklist.clear_plan_cache()
        yield
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)
        worklist.clear_plan_cache()


@contextlib.contextmanager
def host_path(name: str):
    """Run the calls inside on the ``native`` host path (csrc/host_path.cpp) or the
    ``python`` one (what runs when ``gradstats._C`` is not built)."""
    saved = native.host_path_available
    if name == "python":
        native.host_path_available = lambda: False
    elif not saved():
        raise RuntimeError(f"the native host path is not available: "
                           f"{native.unavailable_reason() or 'gradstats._C lacks host_pass'}")
    try:
        yield
    finally:
        native.host_path_available = saved


def new_gradient_objects(params) -> None:
    """Every parameter gets a new gradient object on the same memory, as
    ``zero_grad(set_to_none=True)`` then backward do with a steady allocator."""
    for param in params:
        param.grad = param.grad.detach()


class Case:
    """One timed call: ``fn()``, after ``setup()`` (untimed) when given."""

    def __init__(self, fn, setup=None):
        self.fn, self.setup = fn, setup


def cases(params) -> dict[str, Case]:
    """What is timed."""
    monitor = gradstats.GradMonitor(params, sinks=None)
    renew = functools.partial(new_gradient_objects, params)
    return {
        "fused_clip_grad_norm_, no clipping needed":
            Case(lambda: gradstats.fused_clip_grad_norm_(params, 1e9)),
        "fused_clip_grad_norm_, clipping":
            Case(lambda: gradstats.fused_clip_grad_norm_(params, 1e-3)),
        "fused_clip_grad_norm_, clipping, new gradient objects":
            Case(lambda: gradstats.fused_clip_grad_norm_(params, 1e-3), renew),
        "grad_stats(histogram=False)":
            Case(lambda: gradstats.grad_stats(params, histogram=False)),
        "grad_stats(histogram=False), new gradient objects":
            Case(lambda: gradstats.grad_stats(params, histogram=False), renew),
        "GradMonitor.step(max_norm=1.0)":
            Case(lambda: monitor.step(max_norm=1.0)),
        "GradMonitor.step(max_norm=1.0), new gradient objects":
            Case(lambda: monitor.step(max_norm=1.0), renew),
    }


def host_us(case: Case, calls: int, paths=("native",)) -> dict[str, tuple[float, float]]:
    """Median and minimum microseconds per call, by host path; the paths take turns call
    by call, so load on a shared machine hits them alike."""
    for path in paths:
        with host_path(path):
            for _ in range(WARMUP_CALLS):
                if case.setup is not None:
                    case.setup()
                case.fn()
    samples = {path: [] for path in paths}
    for _ in range(calls):
        for path in paths:
            with host_path(path):
                if case.setup is not None:
                    case.setup()
                start = time.perf_counter()
                case.fn()
                samples[path].append((time.perf_counter() - start) * 1e6)
    return {path: (statistics.median(times), min(times)) for path, times in samples.items()}


def measure(calls: int | None = None, paths=HOST_PATHS) -> list[dict]:
    rows = []
    with stubbed_gpu_path():
        for workload, shapes in WORKLOADS.items():
            params = make_params(shapes(), torch.float32, "cpu")
            for case_name, case in cases(params).items():
                figures = host_us(case, calls or DEFAULT_CALLS[workload], paths)
                for path, (median, best) in figures.items():
                    rows.append({"workload": workload, "tensors": len(params),
                                 "case": case_name, "host_path": path,
                                 "median_us": round(median, 1), "min_us": round(best, 1)})
                    print(f"{workload:34s} {case_name:54s} {path:7s} {median:10.1f} us "
                          f"(min {best:.1f})", flush=True)
            del params
    return rows


def write_results(rows: list[dict], out: Path, note: str) -> None:
    import triton

    out.mkdir(parents=True, exist_ok=False)
    with open(out / "host-overhead.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Host time per call, GPU path, launches stubbed",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- command: `python -m benchmarks.host_overhead {shlex.join(sys.argv[1:])}`",
        f"- machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}",
        f"- torch {torch.__version__}, triton {triton.__version__}, "
        f"gradstats at {Path(gradstats.__file__).parent}",
        "- method: CPU tensors down the Triton backend's host path, kernel launches "
        "stubbed; Triton's launch path, the CUDA allocator and the device guard are not "
        "counted (see benchmarks/host_overhead.py)",
    ]
    if note:
        lines.append(f"- note: {note}")
    lines += ["", "| workload | call | host path | median µs | min µs |",
              "|---|---|---|---:|---:|"]
    lines += [f"| {r['workload']} | {r['case']} | {r['host_path']} | {r['median_us']:.1f} "
              f"| {r['min_us']:.1f} |" for r in rows]
    ratios = _native_over_python(rows)
    if ratios:
        lines += ["", "Native host path over Python host path (same run, calls interleaved; "
                  "on a loaded machine the minima are the steadier pair):", "",
                  "| workload | call | native / python, medians | native / python, minima |",
                  "|---|---|---:|---:|"]
        lines += [f"| {workload} | {case} | {median:.3f} | {best:.3f} |"
                  for workload, case, median, best in ratios]
    (out / "host-overhead.md").write_text("\n".join(lines) + "\n")
    print(f"results in {out}")


def _native_over_python(rows: list[dict]) -> list[tuple[str, str, float, float]]:
    """(workload, case, median ratio, minimum ratio) where both paths were timed."""
    by_path = {(r["workload"], r["case"], r["host_path"]): r for r in rows}
    ratios = []
    for (workload, case, path), python in by_path.items():
        ours = by_path.get((workload, case, "native"))
        if path == "python" and ours is not None:
            ratios.append((workload, case, ours["median_us"] / python["median_us"],
                           ours["min_us"] / python["min_us"]))
    return ratios


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=None,
                        help="timed calls per figure (default: 400 / 60 by workload)")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--note", default="", help="a line for the results file")
    parser.add_argument("--paths", default=",".join(HOST_PATHS),
                        help="host paths to time, comma-separated: native, python "
                             "(default: both)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # host work is single-threaded; keep intra-op pools quiet
    rows = measure(args.calls, tuple(args.paths.split(",")))
    write_results(rows, args.out or new_results_dir(RESULTS_ROOT, torch.device("cpu")),
                  args.note)


if __name__ == "__main__":
    main()
