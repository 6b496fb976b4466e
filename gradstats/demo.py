"""A short training run watched with gradstats (``make demo``).

A deep tanh MLP with a small initialisation is trained for a few steps under a
``GradMonitor``: every step one fused pass computes all gradient statistics and clips, and
the records reach the sinks (a table printed here, a JSONL file) without a host sync.
Deep tanh stacks shrink the gradient by about the same factor per layer (norms fall like
gamma^depth), which the per-layer norm profile printed at the end shows on a log axis,
with its slope log10(gamma).
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import gradstats


def build_model(depth: int, width: int, init_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, std=init_gain / math.sqrt(width))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def slope_per_layer(log_norms: list[float]) -> float:
    """Least-squares slope of log10(norm) against layer index."""
    n = len(log_norms)
    mean_x, mean_y = (n - 1) / 2, sum(log_norms) / n
    cov = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(log_norms))
    var = sum((i - mean_x) ** 2 for i in range(n))
    return cov / var


class ProgressTable:
    """A custom sink: prints each step's record once it reaches the host and keeps the
    last one. Any object with ``write(record)`` can be a sink."""

    def __init__(self):
        self.last = None
        print(f"{'step':>4} {'grad norm':>10} {'clip coef':>9} {'NaN/Inf':>7}  largest module")

    def write(self, record: gradstats.StepRecord) -> None:
        largest = max(record.module_norms, key=record.module_norms.get)
        print(f"{record.step:>4} {record.total_norm:>10.4g} {record.clip_coef:>9.3f} "
              f"{sum(record.nonfinite.values()):>7}  {largest}")
        self.last = record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--init-gain", type=float, default=0.6, help="weight std * sqrt(width)")
    parser.add_argument("--max-norm", type=float, default=0.01)
    parser.add_argument("--log", default="runs/demo/grads.jsonl",
                        help="JSONL record file (replaced on each run)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(args.depth, args.width, args.init_gain).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = torch.randn(256, args.width, device=device)
    targets = torch.sin(inputs.sum(1, keepdim=True))

    print(f"device {device}; {args.depth} tanh layers of width {args.width}")
    table = ProgressTable()
    # Every step: one fused pass for all statistics and the clip; histograms on the last.
    with gradstats.GradMonitor(model, hist_every=max(1, args.steps - 1),
                               sinks=[table, f"jsonl+overwrite:{args.log}"]) as monitor:
        for _ in range(args.steps):
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            monitor.step(max_norm=args.max_norm)
            optimizer.step()
    record = table.last
    print(f"final loss {loss.item():.5f}; one JSON record per step in {args.log}")

    # A bias gradient is the back-propagated signal itself (summed over the batch), so its
    # norm per layer traces the product of Jacobians without the activations' scale.
    biases = [name for name in record.norms if name.endswith("bias")][:-1]
    log_norms = [math.log10(max(record.norms[name], 1e-300)) for name in biases]
    print("\nper-layer gradient norm of the biases, log10, input side first:")
    low = min(log_norms)
    for name, value in zip(biases, log_norms):
        print(f"  {name:>8} {value:8.3f} " + "#" * (1 + int(10 * (value - low))))
    slope = slope_per_layer(log_norms)
    print(f"slope {slope:+.3f} per layer: the gradient grows by gamma = {10 ** slope:.3f} per "
          f"layer towards the output, a factor {10 ** (slope * (len(log_norms) - 1)):.3g} "
          "across the stack (gamma > 1: vanishing towards the input)")
    counts = [sum(column) for column in zip(*record.hist.values())]
    print(f"exact-zero gradient entries: {counts[0] / sum(counts):.2%}; histogram edges from "
          f"{record.bin_edges[1]:.3g} to {record.bin_edges[-1]:.3g}")


if __name__ == "__main__":
    main()
