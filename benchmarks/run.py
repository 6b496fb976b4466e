"""gradstats against torch.nn.utils and the Python-loop monitoring users write, one table.

    python -m benchmarks.run [--device cuda|cpu] [--workloads ...] [--dtypes ...] [--out DIR]

Every row times gradstats and its baseline in the same run and reports their ratio
(``gradstats / baseline``: below 1 is faster); on CPUs the two alternate round by round and
the ratio is the median of the per-round ratios, with its spread (see ``timing.py``). On
GPUs each row also shows the bytes it must move per second against a plain read of the
same bytes (``x.sum()``, the floor), measured in the same run. Results: Markdown and CSV in
a new folder ``benchmarks/results/<device>-<date>`` (or ``--out``), a plot if matplotlib is
installed; the committed results are never overwritten unless ``--out`` names their folder.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import gradstats
from benchmarks.baselines import python_loop_stats, python_loop_stats_with_histogram
from benchmarks.timing import host_us_per_call, median_ms, new_results_dir, paired_ms
from benchmarks.workloads import WORKLOADS, make_params
from gradstats import worklist
from gradstats.backend import backend_info

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_DEFAULT_WORKLOADS = ["gpt2-small", "resnet50", "many-small"]
RESULTS_ROOT = Path("benchmarks/results")


@dataclass
class Case:
    name: str
    ours: object  # () -> None
    baseline_name: str
    baseline: object
    passes: float  # gradient reads + writes the fastest version must make
    reset: object = None  # () -> None, untimed before every call: undoes the last one's clip


@dataclass
class Row:
    workload: str
    dtype: str
    case: str
    baseline: str
    ours_ms: float
    baseline_ms: float
    ratio: float  # gradstats / baseline (see timing.Paired)
    spread: float  # relative interquartile range of the ratio (CPU), 0 on GPUs
    bytes_moved: int
    floor_ms: float
    extra: dict = field(default_factory=dict)

    @property
    def of_floor(self) -> float:
        """Achieved bandwidth over the plain-read bandwidth of this run."""
        return self.floor_ms * (self.bytes_moved / self.floor_bytes) / self.ours_ms

    floor_bytes: int = 1


def cases_for(params) -> list[Case]:
    grads = [p.grad for p in params]
    norm = float(gradstats.get_total_norm(grads))
    # Every clipping call starts from the same gradients (restored untimed) and scales them
    # by 0.5. Without the reset, repeats find the norm at max_norm already: gradstats'
    # float32 coefficient max / (max + 1e-6) rounds to 1.0 and it skips the scale, while
    # torch multiplies by 1.0, so the case would time different work on the two sides.
    clipping = 0.5 * norm
    saved = [grad.clone() for grad in grads]
    restore = functools.partial(torch._foreach_copy_, grads, saved)
    return [
        Case("clip, no clipping needed", lambda: gradstats.fused_clip_grad_norm_(params, 1e9),
             "torch clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1e9), 1),
        Case("clip, no clipping needed", lambda: gradstats.fused_clip_grad_norm_(params, 1e9),
             "torch clip_grad_norm_(foreach=False)",
             lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=False), 1),
        Case("clip, clipping needed", lambda: gradstats.fused_clip_grad_norm_(params, clipping),
             "torch clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, clipping), 3,
             restore),
        Case("get_total_norm", lambda: gradstats.get_total_norm(grads),
             "torch get_total_norm", lambda: torch.nn.utils.get_total_norm(grads), 1),
        Case("stats: norms + NaN/Inf", lambda: gradstats.grad_stats(params, histogram=False),
             "Python loop: norm().item(), isfinite().all()",
             lambda: python_loop_stats(params), 1),
        Case("stats + histogram", lambda: gradstats.grad_stats(params),
             "Python loop + histc (as wandb.watch)",
             lambda: python_loop_stats_with_histogram(params), 1),
        Case("stats + histogram + clip", lambda: gradstats.grad_stats(params, max_norm=clipping),
             "torch clip_grad_norm_ + Python loop + histc",
             lambda: (torch.nn.utils.clip_grad_norm_(params, clipping),
                      python_loop_stats_with_histogram(params)), 3, restore),
    ]


def floor_ms(nbytes: int, dtype: torch.dtype, device: torch.device) -> float:
    flat = torch.randn(nbytes // torch.empty((), dtype=dtype).element_size(), device=device,
                       dtype=torch.float32).to(dtype)
    return median_ms(lambda: flat.sum(), device)


def host_overheads(params, device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    clip = lambda: gradstats.fused_clip_grad_norm_(params, 1e9)  # noqa: E731
    return {
        "host_us_cached": host_us_per_call(clip, device),
        "host_us_rebuilt": host_us_per_call(clip, device, before_each=worklist.clear_plan_cache),
        "host_us_torch": host_us_per_call(lambda: torch.nn.utils.clip_grad_norm_(params, 1e9),
                                          device),
    }


def run(device: torch.device, workloads: list[str], dtypes: list[str]) -> list[Row]:
    rows = []
    jobs = [(w, d) for w in workloads for d in dtypes]
    for index, (workload, dtype_name) in enumerate(jobs, 1):
        dtype = DTYPES[dtype_name]
        params = make_params(WORKLOADS[workload](), dtype, device)
        nbytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
        floor = floor_ms(nbytes, dtype, device)
        extra = host_overheads(params, device)
        cases = cases_for(params)
        for step, case in enumerate(cases, 1):
            print(f"\r[{index}/{len(jobs)}] {workload} {dtype_name}: {step}/{len(cases)} "
                  f"{case.name:<28}", end="", file=sys.stderr, flush=True)
            timed = paired_ms(case.ours, case.baseline, device, case.reset)
            row = Row(workload, dtype_name, case.name, case.baseline_name, timed.ours_ms,
                      timed.baseline_ms, timed.ratio, timed.spread,
                      int(case.passes * nbytes), floor, extra if step == 1 else {})
            row.floor_bytes = nbytes
            rows.append(row)
        del params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(file=sys.stderr)
    return rows


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; on these shared machines the same
    command lands on AMD EPYC or Intel Xeon hosts, whose ratios differ)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, module: str = "benchmarks.run") -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python -m {module} " + shlex.join(sys.argv[1:]),
        "backend": backend_info()[device.type],
    }


def markdown(rows: list[Row], env: dict, device: torch.device) -> str:
    lines = [f"# gradstats benchmarks: {env['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "ratio = gradstats time / baseline time, measured in the same run (below 1 "
              "is faster).", ""]
    header = "| workload | dtype | gradstats | baseline | gradstats ms | baseline ms | ratio |"
    rule = "|---|---|---|---|---|---|---|"
    on_cpu = device.type != "cuda"
    if on_cpu:
        lines[-1:] = ["On this CPU the two alternate round by round: ratio = median of the "
                        "per-round ratios, spread = their interquartile range / median.", ""]
        header += " spread |"
        rule += "---|"
    else:
        header += " of floor |"
        rule += "---|"
    lines += [header, rule]
    for row in rows:
        line = (f"| {row.workload} | {row.dtype} | {row.case} | {row.baseline} | "
                f"{row.ours_ms:.3f} | {row.baseline_ms:.3f} | {row.ratio:.3f} |")
        if on_cpu:
            line += f" {row.spread:.0%} |"
        else:
            line += f" {row.of_floor:.2f} |"
        lines.append(line)
    floors = {(r.workload, r.dtype): r.floor_ms for r in rows}
    lines += ["", "Plain read of the same bytes (`x.sum()`), ms: " + ", ".join(
        f"{w} {d} {ms:.3f}" for (w, d), ms in floors.items())]
    host = [r for r in rows if r.extra]
    if host:
        lines += ["", "Host time per `fused_clip_grad_norm_` call (µs, Python + launches):", "",
                  "| workload | dtype | plan cached | plan rebuilt | torch clip_grad_norm_ |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.workload} | {r.dtype} | {r.extra['host_us_cached']:.0f} | "
                  f"{r.extra['host_us_rebuilt']:.0f} | {r.extra['host_us_torch']:.0f} |"
                  for r in host]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], env: dict, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["workload", "dtype", "case", "baseline", "gradstats_ms", "baseline_ms",
                         "ratio", "spread", "bytes_moved", "floor_ms", "of_floor", *env.keys()])
        for row in rows:
            writer.writerow([row.workload, row.dtype, row.case, row.baseline,
                             f"{row.ours_ms:.5f}", f"{row.baseline_ms:.5f}", f"{row.ratio:.5f}",
                             f"{row.spread:.4f}", row.bytes_moved, f"{row.floor_ms:.5f}",
                             f"{row.of_floor:.4f}", *env.values()])


def plot(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r.workload} {r.dtype}\n{r.case} vs {r.baseline}" for r in rows]
    figure, axis = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    axis.barh(range(len(rows)), [r.ratio for r in rows])
    axis.set_yticks(range(len(rows)), labels, fontsize=6)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xlabel("gradstats time / baseline time (log; < 1 is faster)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the gradients live (default: cuda if available, else cpu)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        help="default: all on GPUs; " + ", ".join(CPU_DEFAULT_WORKLOADS)
                        + " on CPUs")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="gradient dtypes (default: all)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: a new benchmarks/results/<device>-<date>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    workloads = args.workloads or (list(WORKLOADS) if device.type == "cuda"
                                   else CPU_DEFAULT_WORKLOADS)
    rows = run(device, workloads, args.dtypes)
    env = environment(device)
    out = args.out or new_results_dir(RESULTS_ROOT, device)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"results-{device.type}"
    text = markdown(rows, env, device)
    stem.with_suffix(".md").write_text(text)
    write_csv(rows, env, stem.with_suffix(".csv"))
    plotted = plot(rows, stem.with_suffix(".png"))
    print(text)
    print(f"written: {stem}.md, {stem}.csv" + (f", {stem}.png" if plotted else
                                                " (no plot: matplotlib not installed)"))


if __name__ == "__main__":
    main()
