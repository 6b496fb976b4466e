"""Host time per call of two gradstats source trees, measured in turn on one machine.

    python -m benchmarks.host_overhead_trees OTHER_TREE [--rounds 3] [--calls 200]
                                            [--out DIR]

On a shared machine whose speed drifts for minutes at a time, two versions timed in separate
runs cannot be compared. Here ``benchmarks.host_overhead --paths native`` runs in this tree
and in ``OTHER_TREE`` (a checkout of another commit, e.g. a ``git worktree``, with its own
``gradstats._C`` built), one after the other, ``--rounds`` times: each process imports its
own tree's gradstats. Per case, the figure kept is the lowest of the rounds' medians (the
round least disturbed), and the ratio compares those. Results: ``host-overhead-trees.md`` in
a new folder under ``benchmarks/results/`` (or ``--out``), with every round's medians.

``--at-once``: in each round the two trees run at the same time, each pinned to a core of
its own (the cores swapped every round), so a slow spell of the machine hits both alike;
the median of the rounds' ratios is then the figure to read. On the 2-core Xeon VM two
runs of one tree at once agreed within 1%, where runs in turn differed by up to 40%.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.run import cpu_model
from benchmarks.timing import new_results_dir

THIS_TREE = Path(__file__).resolve().parents[1]


def _git_commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _start_run(tree: Path, calls: int, scratch: Path, cpu: int | None = None):
    """A host_overhead run of ``tree`` (pinned to ``cpu`` when given), started: the process
    and the folder its results go to."""
    out = scratch / f"run-{len(list(scratch.iterdir()))}"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    # Its errors go to a file: a pipe left unread while the other run is awaited could fill
    # and stall this one.
    with open(out / "stderr.txt", "wb") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.host_overhead", "--paths", "native",
             "--calls", str(calls), "--out", str(out / "results")],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=errors, preexec_fn=pin)
    return process, out / "results"


def _finish_run(process, out: Path) -> dict[tuple[str, str], float]:
    """Medians (us) by (workload, case) of a started run, once it has ended."""
    if process.wait() != 0:
        errors = (out.parent / "stderr.txt").read_text(errors="replace")
        raise RuntimeError(f"host_overhead failed:\n{errors[-2000:]}")
    with open(out / "host-overhead.csv", newline="") as f:
        return {(row["workload"], row["case"]): float(row["median_us"])
                for row in csv.DictReader(f)}


def measure(other: Path, rounds: int, calls: int, at_once: bool = False
            ) -> dict[str, list[dict]]:
    trees = {"this": THIS_TREE, "other": other}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    if at_once and not (hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2):
        raise RuntimeError("--at-once needs two cores and os.sched_setaffinity")
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(rounds):
            if at_once:  # both at once, on cores 0 and 1, swapped every round
                cpus = (0, 1) if round_index % 2 == 0 else (1, 0)
                started = {name: _start_run(tree, calls, Path(scratch), cpu)
                           for (name, tree), cpu in zip(trees.items(), cpus)}
                for name, (process, out) in started.items():
                    runs[name].append(_finish_run(process, out))
            else:
                for name, tree in trees.items():
                    runs[name].append(_finish_run(*_start_run(tree, calls, Path(scratch))))
            print(f"round {round_index + 1}/{rounds} done", flush=True)
    return runs


def write_results(runs: dict[str, list[dict]], other: Path, out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=False)
    lines = [
        "# Host time per call, two source trees "
        f"{'at once' if args.at_once else 'in turn'} (GPU path, launches stubbed)",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- command: `python -m benchmarks.host_overhead_trees {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        f"- this tree: {THIS_TREE} at {_git_commit(THIS_TREE)}; other tree: {other} at "
        f"{_git_commit(other)}",
        f"- method: `benchmarks.host_overhead --paths native --calls {args.calls}` run "
        f"{args.rounds} times per tree, "
        + ("both trees at once, each on a core of its own (swapped every round)"
           if args.at_once else "the trees taking turns")
        + "; kept per case: the lowest of the rounds' medians, and the median of the "
        "rounds' ratios (this / other within a round)",
        "",
        "| workload | call | this tree µs | other tree µs | this / other, lowest medians "
        "| this / other, median of rounds | every round: this; other |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for key in runs["this"][0]:
        this = [run[key] for run in runs["this"]]
        other_runs = [run[key] for run in runs["other"] if key in run]
        if not other_runs:
            continue
        rounds = (", ".join(f"{v:.0f}" for v in this) + "; "
                  + ", ".join(f"{v:.0f}" for v in other_runs))
        paired = statistics.median(a / b for a, b in zip(this, other_runs))
        lines.append(f"| {key[0]} | {key[1]} | {min(this):.1f} | {min(other_runs):.1f} "
                     f"| {min(this) / min(other_runs):.3f} | {paired:.3f} | {rounds} |")
    (out / "host-overhead-trees.md").write_text("\n".join(lines) + "\n")
    print(f"results in {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other source tree (with _C built)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--at-once", action="store_true",
                        help="run the two trees at the same time, one per core")
    args = parser.parse_args(argv)
    runs = measure(args.other.resolve(), args.rounds, args.calls, args.at_once)
    import torch

    write_results(runs, args.other.resolve(),
                  args.out or new_results_dir(Path("benchmarks/results"), torch.device("cpu")),
                  args)


if __name__ == "__main__":
    main()
