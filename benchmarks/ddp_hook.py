"""DDPStatsHook against the post-backward pass on the same DDP model (gloo CPU ranks).

Each step times ``backward`` and the clip (or statistics) call after it; forward is not
timed. Per round, on both ranks in lockstep, every variant runs one step on its own DDP
copy of the same model (same weights, same batch; no optimizer step, so the gradients
stay the same from round to round), in an order rotated from round to round:

- ``hook``: ``DDPStatsHook(model, histogram=False)``, then ``hook.clip_grad_norm_``: the
  norms were taken per bucket during backward; the call finalizes and scales;
- ``fused``: plain DDP, then ``gradstats.fused_clip_grad_norm_`` (one read after backward);
- ``allreduce_hook+fused``: the same, with torch's Python ``allreduce_hook`` registered:
  what averaging through a Python hook costs by itself (``hook`` wraps that hook);
- ``torch``: plain DDP, then ``torch.nn.utils.clip_grad_norm_``;
- ``hook+hist`` / ``grad_stats``: the same with histograms, ``hook.grad_stats(max_norm)``
  against ``gradstats.grad_stats(model, max_norm=...)``.

Times are rank 0's (the all-reduces keep the ranks within a bucket of each other). The
statistics run on the thread that completes each bucket's all-reduce (gloo's), beside
backward on the main thread: with 2 ranks on a 2-core machine both cores are already busy.
With ``--world 1`` each all-reduce has completed before the hook chains onto it, so the
statistics run inline on backward's thread: the cost moved into backward, with no overlap.
Ratios are medians of per-round ratios, with their interquartile range over the median
(benchmarks/timing.py's convention); the rounds are fixed in number, not in seconds, so
both ranks run the same collectives.

    python -m benchmarks.ddp_hook [--rounds 40] [--layers 4] [--width 256] [--batch 4]
        [--seq 32] [--world 2] [--threads 1] [--bucket-cap-mb 1]
        [--out benchmarks/results/ddp-hook-cpu.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARMUP_ROUNDS = 3
CASES = {"clipping": 1e-3, "no clipping needed": 1e9}  # max_norm


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width,
                                             batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _variants(net: torch.nn.Module, max_norm: float, bucket_cap_mb: float):
    """name -> (ddp model, call after backward, the hook or None)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import gradstats
    DDP = torch.nn.parallel.DistributedDataParallel

    def ddp():
        model = DDP(_copy(net), bucket_cap_mb=bucket_cap_mb)
        return model

    hooked, hooked_hist, plain, python_hooked = ddp(), ddp(), ddp(), ddp()
    hook = gradstats.DDPStatsHook(hooked, histogram=False)
    hook_hist = gradstats.DDPStatsHook(hooked_hist, histogram=True)
    python_hooked.register_comm_hook(None, default_hooks.allreduce_hook)
    return {
        "hook": (hooked, lambda: hook.clip_grad_norm_(max_norm), hook),
        "fused": (plain, lambda: gradstats.fused_clip_grad_norm_(plain, max_norm), None),
        "allreduce_hook+fused": (
            python_hooked, lambda: gradstats.fused_clip_grad_norm_(python_hooked, max_norm),
            None),
        "torch": (plain, lambda: torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm),
                  None),
        "hook+hist": (hooked_hist, lambda: hook_hist.grad_stats(max_norm), hook_hist),
        "grad_stats": (plain, lambda: gradstats.grad_stats(plain, max_norm=max_norm), None),
    }


def _copy(net):
    import copy
    return copy.deepcopy(net)


def _step(model, after_backward, hook, batch) -> tuple[float, float, bool]:
    """(backward ms, call ms, whether the hook's partials were used)."""
    model.zero_grad(set_to_none=True)
    loss = model(batch).square().mean()
    dist.barrier()
    start = time.perf_counter()
    loss.backward()
    backward_ms = (time.perf_counter() - start) * 1e3
    used = hook is not None and hook.ready  # outside the timed regions
    start = time.perf_counter()
    after_backward()
    call_ms = (time.perf_counter() - start) * 1e3
    return backward_ms, call_ms, used


def _rank_main(rank: int, port: int, args, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        net = _model(args.layers, args.width)
        generator = torch.Generator().manual_seed(rank)
        batch = torch.randn(args.batch, args.seq, args.width, generator=generator)
        results = {}
        for case, max_norm in CASES.items():
            variants = _variants(net, max_norm, args.bucket_cap_mb)
            names = list(variants)
            samples = {name: [] for name in names}
            for round_index in range(WARMUP_ROUNDS + args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    measured = _step(*variants[name], batch)
                    if round_index >= WARMUP_ROUNDS:
                        samples[name].append(measured)
            results[case] = samples
        if rank == 0:
            with open(result_path, "w") as file:
                json.dump([sum(p.numel() for p in net.parameters()),
                           len(list(net.parameters())), results], file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _summary(samples, ours: str, baseline: str) -> str:
    totals = {name: [b + c for b, c, _ in samples[name]] for name in (ours, baseline)}
    ratios = [a / b for a, b in zip(totals[ours], totals[baseline])]
    median = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4)
    return (f"| {ours} / {baseline} | {statistics.median(totals[ours]):.2f} | "
            f"{statistics.median(totals[baseline]):.2f} | {median:.3f} | "
            f"{(quartiles[2] - quartiles[0]) / median:.2f} |")


def _report(args, n_params, n_tensors, results, load_before, load_after, elapsed) -> str:
    import triton

    import gradstats
    lines = [
        f"# DDPStatsHook against the post-backward pass (gloo, {args.world} CPU rank(s))",
        "",
        f"- device: CPU {platform.machine()}, {os.cpu_count()} cores shared with other "
        f"jobs; {args.world} rank(s), {args.threads} thread(s) each; backend "
        f"{gradstats.backend_info().get('cpu')}",
        f"- load average (1, 5, 15 min): before {load_before}, after {load_after}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python "
        f"{platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"run took {elapsed:.0f} s",
        f"- command: python -m benchmarks.ddp_hook {' '.join(sys.argv[1:])}".rstrip(),
        f"- model: TransformerEncoder, {args.layers} layers, width {args.width}: "
        f"{n_params / 1e6:.2f} M parameters in {n_tensors} tensors (fp32); batch "
        f"{args.batch} x {args.seq}; DDP bucket_cap_mb={args.bucket_cap_mb:g}",
        f"- {args.rounds} rounds after {WARMUP_ROUNDS} warm-up rounds; rank 0's times; "
        "ratio: median of per-round ratios of (backward + call); spread: their "
        "interquartile range over the median",
        "",
    ]
    for case, samples in results.items():
        lines += [f"## {case} (max_norm {CASES[case]:g})", "",
                  "| variant | backward ms | call ms | backward + call ms | partials used |",
                  "|---|---|---|---|---|"]
        for name, rows in samples.items():
            backward = statistics.median(b for b, _, _ in rows)
            call = statistics.median(c for _, c, _ in rows)
            total = statistics.median(b + c for b, c, _ in rows)
            used = (f"{sum(u for _, _, u in rows)}/{len(rows)}"
                    if name.startswith("hook") else "")
            lines.append(f"| {name} | {backward:.2f} | {call:.3f} | {total:.2f} | {used} |")
        lines += ["", "| pair | ours ms | baseline ms | ratio | spread |", "|---|---|---|---|---|",
                  _summary(samples, "hook", "fused"), _summary(samples, "hook", "torch"),
                  _summary(samples, "hook", "allreduce_hook+fused"),
                  _summary(samples, "hook+hist", "grad_stats"), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--world", type=int, default=2,
                        help="ranks (1: the statistics run inline in backward)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--bucket-cap-mb", type=float, default=1.0,
                        help="DDP's bucket size; 1 MiB: 12 buckets for the default model")
    parser.add_argument("--out", default="benchmarks/results/ddp-hook-cpu.md")
    args = parser.parse_args()
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "rank0.json")
        mp.start_processes(_rank_main, args=(_free_port(), args, result_path), nprocs=args.world,
                           start_method="spawn")
        with open(result_path) as file:
            n_params, n_tensors, results = json.load(file)
    elapsed = time.perf_counter() - start
    load_after = tuple(round(x, 2) for x in os.getloadavg())
    report = _report(args, n_params, n_tensors, results, load_before, load_after, elapsed)
    with open(args.out, "w") as file:
        file.write(report)
    sys.stdout.write(report)


if __name__ == "__main__":
    main()
