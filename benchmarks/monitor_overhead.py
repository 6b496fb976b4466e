"""What GradMonitor costs per training step, against no monitoring and the Python loops.

    python -m benchmarks.monitor_overhead [--device cuda|cpu] [--batch B] [--tokens T]
                                          [--rounds N] [--out DIR]

Trains a GPT-2-small-shaped model (124M parameters, 148 gradient tensors) and times whole
training steps, the variants interleaved round by round so drift hits them all alike:

- baseline: ``torch.nn.utils.clip_grad_norm_`` and no monitoring;
- ``monitor.step(max_norm)`` in its place (statistics + clipping from one pass, a JSONL
  record every step), without and with histograms every step;
- torch clipping plus the Python loops users write today (``norm().item()``,
  ``isfinite().all()``; plus ``histc`` per tensor as wandb.watch does).

It also times the monitoring alone on one set of gradients (``monitor.step()`` against
the loop), which is steadier than differences of whole steps. Results: Markdown and CSV.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import gradstats
from benchmarks.baselines import python_loop_stats, python_loop_stats_with_histogram
from benchmarks.run import RESULTS_ROOT, environment
from benchmarks.timing import new_results_dir, paired_ms
from benchmarks.training import GPT, GPTConfig, training_step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variants(model, log_dir: Path) -> dict:
    parameters = list(model.parameters())
    monitor = gradstats.GradMonitor(model, sinks=[f"jsonl:{log_dir}/stats.jsonl"])
    monitor_hist = gradstats.GradMonitor(model, hist_every=1,
                                         sinks=[f"jsonl:{log_dir}/stats-hist.jsonl"])

    def clip():
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)

    return {
        "torch clip_grad_norm_, no monitoring": clip,
        "GradMonitor.step(max_norm), log_every=1": lambda: monitor.step(max_norm=1.0),
        "GradMonitor.step(max_norm), log_every=1, histograms": lambda: monitor_hist.step(
            max_norm=1.0),
        "torch clip + Python loop (norm().item(), isfinite)": lambda: (
            clip(), python_loop_stats(parameters)),
        "torch clip + Python loop + histc (wandb.watch)": lambda: (
            clip(), python_loop_stats_with_histogram(parameters)),
    }, (monitor, monitor_hist)


def time_training(model, optimizer, batch, variants, rounds, device, autocast_dtype):
    """Median step ms per variant, variants interleaved per round."""
    tokens, targets = batch
    samples = {name: [] for name in variants}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, after_backward in variants.items():
            print(f"\rround {round_index}/{rounds}: {name:<60}", end="", file=sys.stderr,
                  flush=True)
            synchronize(device)
            start = time.perf_counter()
            training_step(model, optimizer, tokens, targets, autocast_dtype, after_backward)
            synchronize(device)
            if round_index:
                samples[name].append((time.perf_counter() - start) * 1e3)
    print(file=sys.stderr)
    return {name: statistics.median(times) for name, times in samples.items()}


def time_monitoring_alone(model, batch, device, log_dir: Path, autocast_dtype) -> list[tuple]:
    tokens, targets = batch
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        model(tokens, targets).backward()
    parameters = list(model.parameters())
    rows = []
    for hist, loop_name, loop in [
        (False, "Python loop (norm().item(), isfinite)", python_loop_stats),
        (True, "Python loop + histc (wandb.watch)", python_loop_stats_with_histogram),
    ]:
        with gradstats.GradMonitor(model, hist_every=1 if hist else None,
                                   sinks=[f"jsonl:{log_dir}/alone-{hist}.jsonl"]) as monitor:
            timed = paired_ms(monitor.step, lambda: loop(parameters), device)
        name = "GradMonitor.step(), log_every=1" + (", histograms" if hist else "")
        rows.append((name, loop_name, timed.ours_ms, timed.baseline_ms))
    model.zero_grad(set_to_none=True)
    return rows


def markdown(env, config, step_ms, alone) -> str:
    base = step_ms["torch clip_grad_norm_, no monitoring"]
    lines = [f"# GradMonitor overhead: {env['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- model: {config}", "",
              "## Whole training steps (median ms; overhead against the baseline step)", "",
              "| after backward() | step ms | overhead |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {(ms - base) / base:+.1%} |" for name, ms in step_ms.items()]
    lines += ["", "## Monitoring alone, same gradients (median ms)", "",
              "| gradstats | baseline | gradstats ms | baseline ms | baseline / gradstats | "
              "gradstats / training step |", "|---|---|---|---|---|---|"]
    lines += [f"| {ours} | {theirs} | {a:.3f} | {b:.3f} | {b / a:.1f}x | {a / base:.2%} |"
              for ours, theirs, a, b in alone]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=int, help="sequences per step (default: 8 GPU, 1 CPU)")
    parser.add_argument("--tokens", type=int,
                        help="tokens per sequence (default: 1024 GPU, 128 CPU)")
    parser.add_argument("--rounds", type=int,
                        help="timed rounds of every variant (default: 20 GPU, 5 CPU)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: a new benchmarks/results/<device>-<date>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch_size = args.batch or (8 if on_gpu else 1)
    tokens = args.tokens or (1024 if on_gpu else 128)
    rounds = args.rounds or (20 if on_gpu else 5)
    autocast_dtype = torch.bfloat16 if on_gpu else None
    torch.manual_seed(0)
    config = GPTConfig()
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)
    data = torch.randint(config.vocab, (batch_size, tokens + 1), device=device)
    batch = (data[:, :-1], data[:, 1:])
    with tempfile.TemporaryDirectory() as log_dir:
        variants, monitors = make_variants(model, Path(log_dir))
        step_ms = time_training(model, optimizer, batch, variants, rounds, device,
                                autocast_dtype)
        for monitor in monitors:
            monitor.close()
        alone = time_monitoring_alone(model, batch, device, Path(log_dir), autocast_dtype)
    env = environment(device, "benchmarks.monitor_overhead")
    described = (f"GPT-2 small shape, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
                 f"parameters, {len(list(model.parameters()))} tensors, batch {batch_size} x "
                 f"{tokens} tokens, AdamW{' (fused), bf16 autocast' if on_gpu else ''}, "
                 f"{rounds} rounds")
    text = markdown(env, described, step_ms, alone)
    out = args.out or new_results_dir(RESULTS_ROOT, device)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"monitor-{device.type}"
    stem.with_suffix(".md").write_text(text)
    with stem.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["measure", "name", "baseline", "ms", "baseline_ms", *env])
        writer.writerows(["training step", name, "", f"{ms:.4f}", "", *env.values()]
                         for name, ms in step_ms.items())
        writer.writerows(["monitoring alone", ours, theirs, f"{a:.4f}", f"{b:.4f}", *env.values()]
                         for ours, theirs, a, b in alone)
    print(text)
    print(f"written: {stem}.md, {stem}.csv")


if __name__ == "__main__":
    main()
