"""Collectives, bytes and time per call: gradstats against torch on sharded gradients.

Spawns gloo process groups on this CPU (2 and 4 ranks) and, on the same gradients, counts
what each rank issues per call of

- ``torch.nn.utils.clip_grad_norm_`` (the baseline),
- ``gradstats.clip_grad_norm_``,
- ``gradstats.grad_stats(max_norm=..., histogram=True)`` (the same clip, plus per-tensor
  norms, NaN/Inf counts and 64-bin histograms),

for norm types 2 and inf, on three layouts: ``DTensor`` ``Shard(0)`` on a 1-D mesh, a 2-D
(dp, tp) mesh mixing ``[Shard(0), Replicate()]`` and ``[Replicate(), Shard(0)]`` (4 ranks
only: on 2 ranks one dimension would have size 1), and an FSDP2 (``fully_shard``) small
transformer. Collectives and their payload are counted by a dispatch mode that sees both
torch's functional collectives (DTensor's) and ``torch.distributed``'s (gradstats'), as
DTensor's ``CommDebugMode`` does; the bytes are those of the tensors each rank hands to
them. "Reading the total" is ``total.full_tensor()``, what a loop that logs the norm pays
afterwards (torch's inf-norm total is a ``Partial(max)`` DTensor).

Times: per call on rank 0, gradstats and torch alternating for a fixed number of rounds
(every rank must issue the same collectives), after a barrier, the gradients restored
before each call so every call clips; medians, and the median of the per-round ratios.

    python -m benchmarks.distributed_comm [--worlds 2,4] [--rounds 15] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

NORM_TYPES = (2.0, float("inf"))
MAX_NORM = 1e-4  # below every total here: every call scales every gradient
TIMEOUT_S = 600  # a whole world's run; a collective times out after 60 s
RESULTS = Path(__file__).parent / "results" / "distributed-comm-cpu.md"


# -- counting ---------------------------------------------------------------------------------
def _collective_ops() -> set:
    functional, legacy, c10d = (torch.ops._c10d_functional, torch.ops.c10d_functional,
                                torch.ops.c10d)
    names = ("all_reduce", "all_reduce_coalesced", "all_gather_into_tensor",
             "reduce_scatter_tensor", "all_to_all_single", "broadcast")
    ops = {getattr(module, name) for module in (functional, legacy) for name in names
           if hasattr(module, name)}
    c10d_names = ("allreduce_", "allreduce_coalesced_", "_allgather_base_", "allgather_",
                  "_reduce_scatter_base_", "reduce_scatter_", "broadcast_", "alltoall_base_")
    ops |= {getattr(c10d, name) for name in c10d_names if hasattr(c10d, name)}
    return ops


class CountCollectives(TorchDispatchMode):
    """Counts the collectives issued while active and the bytes of the tensors handed to
    them. DTensor ops are let through first (``NotImplemented``), so the collectives they
    desugar into are seen, as in ``CommDebugMode``."""

    def __init__(self):
        super().__init__()
        self.ops = _collective_ops()
        self.count = 0
        self.bytes = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(t is DTensor for t in types):
            return NotImplemented
        if func._overloadpacket in self.ops:
            self.count += 1
            self.names.append(func._overloadpacket.__name__)
            self.bytes += sum(leaf.numel() * leaf.element_size()
                              for leaf in tree_leaves((args, kwargs))
                              if isinstance(leaf, torch.Tensor))
        return func(*args, **(kwargs or {}))


# -- layouts ------------------------------------------------------------------------------------
def gpt2_like_shapes(d: int = 128, ff: int = 512, vocab: int = 4096, ctx: int = 256,
                     layers: int = 12) -> list[tuple[int, ...]]:
    """GPT-2 small's 148 tensors (as ``benchmarks.workloads``), at width ``d``: this
    measures communication, which does not grow with the elements."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


def _dtensor_params(shapes, mesh, placements_for) -> list[torch.nn.Parameter]:
    from torch.distributed.tensor import distribute_tensor

    generator = torch.Generator().manual_seed(0)  # the same full gradients on every rank
    params = []
    for index, shape in enumerate(shapes):
        placements = placements_for(index)
        full = torch.randn(shape, generator=generator) * 1e-3
        param = torch.nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, placements))
        param.grad = distribute_tensor(full, mesh, placements)
        params.append(param)
    return params


def dtensor_1d(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    return _dtensor_params(gpt2_like_shapes(), mesh, lambda index: [Shard(0)])


def dtensor_2d(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    layouts = ([Shard(0), Replicate()], [Replicate(), Shard(0)])
    return _dtensor_params(gpt2_like_shapes(), mesh, lambda index: layouts[index % 2])


class _Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SmallTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 64, heads: int = 4, layers: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList([_Block(dim, heads) for _ in range(layers)])
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).logsumexp(-1).mean()


def fsdp2_transformer(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = SmallTransformer()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens).backward()
    return list(model.parameters())


LAYOUTS = {
    "DTensor Shard(0), 1-D mesh": (dtensor_1d, 2),
    "DTensor 2-D mesh (dp, tp), Shard(0)+Replicate": (dtensor_2d, 4),
    "FSDP2 fully_shard, small transformer": (fsdp2_transformer, 2),
}


# -- one rank -------------------------------------------------------------------------------------
def _calls(params, p):
    import gradstats

    return {
        "torch clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, p),
        "gradstats clip_grad_norm_": lambda: gradstats.clip_grad_norm_(params, MAX_NORM, p),
        "gradstats grad_stats (+clip, histogram)":
            lambda: gradstats.grad_stats(params, p, max_norm=MAX_NORM).total_norm,
    }


def _count(call) -> tuple[int, int, list[str], int]:
    """(collectives, bytes, their names, collectives to read the total) of one call."""
    with CountCollectives() as counted:
        total = call()
    with CountCollectives() as reading:
        if hasattr(total, "full_tensor"):
            total.full_tensor()
    return counted.count, counted.bytes, counted.names, reading.count


def _timed_rounds(params, calls: dict, rounds: int) -> dict[str, list[float]]:
    """Per call, its times over ``rounds`` rounds, the calls alternating within a round;
    the gradients restored and the ranks lined up (a barrier) before every call."""
    saved = [q.grad.to_local().clone() for q in params]
    times = {name: [] for name in calls}
    for _ in range(rounds + 1):  # the first round warms up
        for name, call in calls.items():
            for param, values in zip(params, saved):
                param.grad.to_local().copy_(values)
            dist.barrier()
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    for param, values in zip(params, saved):
        param.grad.to_local().copy_(values)
    return {name: samples[1:] for name, samples in times.items()}


def _rank_main(rank: int, world: int, port: int, rounds: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # DTensor's hint that a 2-D mesh takes two sequential all_reduces (counted here anyway).
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    rows = []
    try:
        for layout, (build, min_world) in LAYOUTS.items():
            if world < min_world:
                continue
            params = build(world)
            for p in NORM_TYPES:
                calls = _calls(params, p)
                counts = {name: _count(call) for name, call in calls.items()}
                times = _timed_rounds(params, calls, rounds)
                baseline = times["torch clip_grad_norm_"]
                for name in calls:
                    count, nbytes, names, read = counts[name]
                    ratios = [a / b for a, b in zip(times[name], baseline)]
                    rows.append(dict(
                        world=world, layout=layout, tensors=len(params), norm=p, call=name,
                        collectives=count, bytes=nbytes, ops=sorted(set(names)),
                        read_total=read, ms=statistics.median(times[name]),
                        ratio=statistics.median(ratios)))
        dist.barrier()  # no rank tears its groups down while another still uses them
    finally:
        if rank == 0:
            with open(os.path.join(outdir, f"world{world}.json"), "w") as file:
                json.dump(rows, file)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, rounds: int) -> list[dict]:
    """Every row rank 0 measured in a group of ``world`` processes."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        processes = [context.Process(target=_rank_main, args=(rank, world, port, rounds, outdir))
                     for rank in range(world)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        path = os.path.join(outdir, f"world{world}.json")
        if not os.path.exists(path) or any(process.exitcode for process in processes):
            raise RuntimeError(f"the {world}-rank run failed (exit codes "
                               f"{[process.exitcode for process in processes]})")
        with open(path) as file:
            return json.load(file)


# -- report ---------------------------------------------------------------------------------------
def _norm_name(p: float) -> str:
    return "inf" if p == float("inf") else f"{p:g}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| ranks | layout (tensors) | norm | call | collectives | bytes sent "
             "| + reading the total | ms per call | / torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "1" if row["call"].startswith("torch") else f"{row['ratio']:.2f}"
        lines.append(
            f"| {row['world']} | {row['layout']} ({row['tensors']}) | {_norm_name(row['norm'])} "
            f"| {row['call']} | {row['collectives']} | {row['bytes']:,} | {row['read_total']} "
            f"| {row['ms']:.2f} | {ratio} |")
    return lines


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header(command: str, load_before: str, load_after: str) -> list[str]:
    import triton

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "# Collectives per call on sharded gradients: gradstats vs torch (gloo, CPU)",
        "",
        f"- device: {cpu_name()}, {os.cpu_count()} cores "
        "shared with other jobs; every rank a process with 1 thread, gloo over loopback",
        f"- load average: {load_before} at the start, {load_after} at the end",
        f"- torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}",
        f"- date: {stamp}",
        f"- command: `{command}`",
        "- gradients: DTensor layouts: GPT-2 small's 148 tensors at width 128 (2.9M "
        "elements, std 1e-3); FSDP2: 4 pre-norm blocks, width 64, vocabulary 512 (53 "
        "tensors), one backward. Clipped to 1e-4 (every call scales every gradient).",
        "- collectives, bytes sent: what each rank issues during one call, counted by a "
        "dispatch mode that sees torch's functional collectives (DTensor's) and "
        "`torch.distributed`'s (gradstats'); bytes: the tensors handed to them.",
        "- + reading the total: collectives that `total.full_tensor()` issues afterwards "
        "(torch's inf-norm total is a `Partial(max)` DTensor; gradstats' is `Replicate`).",
        "- ms per call: rank 0's median over the rounds, the three calls alternating, the "
        "gradients restored and the ranks lined up (a barrier) before each; / torch: the "
        "median of the per-round ratios to torch's `clip_grad_norm_`. More ranks than "
        "cores make these times mostly scheduling: the counts are the result.",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"write the Markdown report there (e.g. {RESULTS})")
    args = parser.parse_args(argv)
    load_before = load_average()
    rows = []
    for world in map(int, args.worlds.split(",")):
        rows += run_world(world, args.rounds)
        for line in table([row for row in rows if row["world"] == world])[2:]:
            print(line, flush=True)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.distributed_comm", *given])
    report = header(command.strip(), load_before, load_average()) + [""] + table(rows)
    if args.out is not None:
        args.out.write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
