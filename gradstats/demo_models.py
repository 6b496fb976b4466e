"""The demo's model zoo: small nets whose gradient profile the literature predicts.

Each :class:`Case` builds a model and a synthetic batch, and says which verdict
:func:`gradstats.diagnose` should give at initialisation and why. Depth is what the
gradient is multiplied over: layers for the feed-forward nets, time steps for the recurrent
ones (each step's hidden state passes a named ``nn.Identity`` probe, so that activation
tracking sees ``dL/dh_t`` for every ``t``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Case:
    name: str
    expected: str  # the verdict the literature predicts
    why: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def deep_linear(depth: int, width: int, gamma: float) -> nn.Sequential:
    """Orthogonal layers scaled by gamma: ``||dL/dh_(l-1)|| = gamma ||dL/dh_l||`` exactly."""
    layers = []
    for _ in range(depth):
        layer = nn.Linear(width, width, bias=False)
        nn.init.orthogonal_(layer.weight)
        with torch.no_grad():
            layer.weight.mul_(gamma)
        layers.append(layer)
    return nn.Sequential(*layers)


def mlp(depth: int, width: int, activation: type[nn.Module], init_std=None) -> nn.Sequential:
    """``depth`` blocks of Linear + activation and a linear head; ``init_std(fan_in)`` draws
    the weights (PyTorch's default init when None), biases zero."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        if init_std is not None:
            nn.init.normal_(linear.weight, std=init_std(width))
            nn.init.zeros_(linear.bias)
        layers += [linear, activation()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class PreNormBlock(nn.Module):
    """``x + MLP(LayerNorm(x))``: the identity path carries the gradient past every block."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class PreNormResidualMLP(nn.Module):
    def __init__(self, depth: int, width: int):
        super().__init__()
        self.blocks = nn.ModuleList(PreNormBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Recurrent(nn.Module):
    """A recurrent cell unrolled over the sequence, the loss on the last state only."""

    def __init__(self, cell: nn.Module, steps: int, hidden: int):
        super().__init__()
        self.cell = cell
        self.steps = nn.ModuleList(nn.Identity() for _ in range(steps))  # probes: h_t
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.head.in_features)
        for t, probe in enumerate(self.steps):
            h = probe(self.cell(x[:, t], h))
        return self.head(h)


def chrono_gru(inputs: int, hidden: int, steps: int) -> nn.GRUCell:
    """A GRU cell whose update gate starts near "keep" with time scales spread up to the
    sequence length (chrono initialisation, Tallec & Ollivier 2018)."""
    cell = nn.GRUCell(inputs, hidden)
    with torch.no_grad():
        update = slice(hidden, 2 * hidden)  # torch's gate order: reset, update, new
        cell.bias_hh[update] = torch.log(torch.empty(hidden).uniform_(1, steps))
        cell.bias_ih[update] = 0.0
    return cell


def cases(quick: bool = False) -> list[Case]:
    """The zoo; ``quick``: shallower and narrower (for tests), the same verdicts."""
    width = 16 if quick else 32
    linear_depth = 100  # gamma^99 is what makes 0.95 and 1.05 vanish and explode
    depth = 12 if quick else 20
    seq = 30 if quick else 50

    def features(generator, size=width):
        x = torch.randn(32, size, generator=generator)
        return x, torch.sin(x.sum(1, keepdim=True))

    def linear_batch(generator):
        x = torch.randn(32, width, generator=generator)
        return x, torch.randn(32, width, generator=generator)

    def sequence(generator):
        x = torch.randn(16, seq, 4, generator=generator)
        return x, x[:, 0, :1]  # remember the first input: a long-range dependency

    def kaiming(gain):
        return lambda fan_in: gain * math.sqrt(2.0 / fan_in)

    zoo = [
        Case(f"linear-gamma-{gamma:.2f}", verdict,
             f"{linear_depth} orthogonal layers scaled by {gamma}: the textbook gamma^(L-l)",
             lambda gamma=gamma: deep_linear(linear_depth, width, gamma), linear_batch)
        for gamma, verdict in ((0.95, "vanishing"), (1.00, "healthy"), (1.05, "exploding"))
    ]
    zoo += [
        Case("sigmoid-mlp", "vanishing",
             f"{depth} sigmoid layers: sigmoid' <= 1/4 shrinks the gradient at every layer",
             lambda: mlp(depth, width, nn.Sigmoid), features),
        Case("relu-mlp-large-init", "exploding",
             f"{depth} ReLU layers with weights 1.5x He init: each layer multiplies by ~1.5",
             lambda: mlp(depth, width, nn.ReLU, kaiming(1.5)), features),
        Case("relu-mlp-he-init", "healthy",
             f"the same {depth} ReLU layers with He (Kaiming) init: variance preserved",
             lambda: mlp(depth, width, nn.ReLU, kaiming(1.0)), features),
        Case("residual-layernorm", "healthy",
             f"{depth} pre-LayerNorm residual blocks: the identity path carries the gradient",
             lambda: PreNormResidualMLP(depth, width), features),
        Case("rnn-vanilla", "vanishing",
             f"a tanh RNN over {seq} steps: the gradient fades going back in time",
             lambda: Recurrent(nn.RNNCell(4, width), seq, width), sequence),
        Case("gru-gated", "healthy",
             f"a GRU over {seq} steps, update gate initialised to keep (chrono init)",
             lambda: Recurrent(chrono_gru(4, width, seq), seq, width), sequence),
    ]
    return zoo
