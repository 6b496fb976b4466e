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
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
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


def _one_run(tree: Path, calls: int, scratch: Path) -> dict[tuple[str, str], float]:
    """Medians (us) by (workload, case) of one host_overhead run of ``tree``."""
    out = scratch / f"run-{len(list(scratch.iterdir()))}"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--paths", "native",
                    "--calls", str(calls), "--out", str(out)],
                   cwd=tree, env=env, check=True, capture_output=True)
    with open(out / "host-overhead.csv", newline="") as f:
        return {(row["workload"], row["case"]): float(row["median_us"])
                for row in csv.DictReader(f)}


def measure(other: Path, rounds: int, calls: int) -> dict[str, list[dict]]:
    trees = {"this": THIS_TREE, "other": other}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(rounds):
            for name, tree in trees.items():
                runs[name].append(_one_run(tree, calls, Path(scratch)))
                print(f"round {round_index + 1}/{rounds}: {name} tree done", flush=True)
    return runs


def write_results(runs: dict[str, list[dict]], other: Path, out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=False)
    lines = [
        "# Host time per call, two source trees in turn (GPU path, launches stubbed)",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- command: `python -m benchmarks.host_overhead_trees {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        f"- this tree: {THIS_TREE} at {_git_commit(THIS_TREE)}; other tree: {other} at "
        f"{_git_commit(other)}",
        f"- method: `benchmarks.host_overhead --paths native --calls {args.calls}` run "
        f"{args.rounds} times per tree, the trees taking turns; kept per case: the lowest "
        "of the rounds' medians",
        "",
        "| workload | call | this tree µs | other tree µs | this / other "
        "| every round: this; other |",
        "|---|---|---:|---:|---:|---|",
    ]
    for key in runs["this"][0]:
        this = [run[key] for run in runs["this"]]
        other_runs = [run[key] for run in runs["other"] if key in run]
        if not other_runs:
            continue
        rounds = (", ".join(f"{v:.0f}" for v in this) + "; "
                  + ", ".join(f"{v:.0f}" for v in other_runs))
        lines.append(f"| {key[0]} | {key[1]} | {min(this):.1f} | {min(other_runs):.1f} "
                     f"| {min(this) / min(other_runs):.3f} | {rounds} |")
    (out / "host-overhead-trees.md").write_text("\n".join(lines) + "\n")
    print(f"results in {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other source tree (with _C built)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    runs = measure(args.other.resolve(), args.rounds, args.calls)
    import torch

    write_results(runs, args.other.resolve(),
                  args.out or new_results_dir(Path("benchmarks/results"), torch.device("cpu")),
                  args)


if __name__ == "__main__":
    main()
