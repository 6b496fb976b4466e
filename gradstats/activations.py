"""Activation tracking: per layer and per step, the forward output and the gradient w.r.t. it.

Why: backprop multiplies one Jacobian per layer, so ``||dL/dh_l||`` against depth is the
profile that shows vanishing or exploding gradients. Parameter gradients can hide it: in a
deep linear net ``||dL/dW_l|| = ||dL/dh_l|| * ||h_(l-1)||`` and the forward growth cancels the
backward decay. So :class:`ActivationTracker` hooks the model's leaf modules and records, for
each one, on the device and without a host sync:

- ``output_norm``: the 2-norm of its output ``h_l`` (several calls in one step: the norm of
  all of them together, so an RNN cell applied per time step or gradient accumulation gives
  one figure);
- ``grad_norm``: the 2-norm of ``dL/dh_l``, from a tensor hook on that output;
- ``output_nonfinite`` / ``grad_nonfinite``: NaN and +-Inf counts of both;
- ``saturated``: for sigmoid/tanh-like modules (:data:`SATURATING`), the fraction of outputs
  within ``SATURATION_MARGIN`` of a bound of the module's range (where the local derivative is
  nearly zero: ``tanh' < 0.02`` at ``|tanh| > 0.99``, ``sigmoid' < 0.01`` within 0.01 of 0 or
  1; exactly zero at the bounds of the hard variants).

Every floating tensor of an output counts (a tuple, list or dict, however nested: an RNN's
``(output, h_n)``, a ``{"logits": ...}``): the norm is of all of them together, and each gets
its ``dL/dh`` hook.

The hooks only queue device ops (a norm and a count or two per call, kept as 0-d device
tensors); which modules ran, and in which order forward and backward, is known on the host
for free, since the hooks run in host code: each call gets a sequence number. Each call's
NaN/Inf count is kept (a module called more than ``MAX_PENDING_CALLS`` times in a step has
them folded, the number of its first non-finite call kept on the device), and
:meth:`ActivationTracker.take` stacks the step's figures into two small device tensors and
hands them to the monitor, which copies them to the host with the gradient statistics
(``record_queue``); there :meth:`ActivationSnapshot.to_record` names where a NaN/Inf was
born: the module of the first call, in call order, whose output went non-finite, or, when
the forward pass was clean, the module of the first ``dL/dh`` computed that did (with
``"from_loss": True`` when that is the very first ``dL/dh`` of the backward pass, the one
the loss hands the model's output: the loss made it). A module called several times (a
shared layer, an RNN cell) is placed by the call that went non-finite, not by its first.

Forward passes run with gradients disabled (evaluation) are not recorded. Limits: when the
model's tree changes, the monitor re-hooks it at its next step, so the step in which a
layer was added sees it only from the next one; with activation checkpointing the
recomputed forward is counted again; under ``GradScaler`` the gradient figures are of the
scaled loss; a NaN loss with finite gradients (``log`` of a negative output) leaves no trace
in outputs or ``dL/dh``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = ["ActivationTracker", "ActivationRecord", "SATURATING", "SATURATION_MARGIN"]

# How close to a bound of its range an output counts as saturated. 0.01: tanh' = 1 - y^2 is
# below 0.02 (2% of its peak) at |y| > 0.99, sigmoid' = y (1 - y) below 0.01 (4% of its peak)
# within 0.01 of 0 or 1: a unit there passes almost no gradient back.
SATURATION_MARGIN = 0.01

# A module called more often than this in one step (an RNN cell over a long sequence, a
# step() that never comes) has its figures folded into one, so memory stays bounded; 64
# keeps a step's snapshot small while the usual models (a few calls per module) never fold.
MAX_PENDING_CALLS = 64

# Module types whose outputs saturate, and their output range (low, high). Exact types:
# ReLU6 is a Hardtanh subclass whose zeros are ordinary ReLU zeros, not saturation.
SATURATING: dict[type, tuple[float, float]] = {
    nn.Sigmoid: (0.0, 1.0),
    nn.Hardsigmoid: (0.0, 1.0),
    nn.Tanh: (-1.0, 1.0),
    nn.Softsign: (-1.0, 1.0),
}

def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules without children, in registration order (the model itself when it has
    none): the layers whose outputs are the hidden states ``h_l``."""
    return [(name, module) for name, module in model.named_modules()
            if next(module.children(), None) is None]


def _saturation_range(module: nn.Module) -> tuple[float, float] | None:
    if type(module) is nn.Hardtanh:
        return (float(module.min_val), float(module.max_val))
    return SATURATING.get(type(module))


def _floating_tensors(output) -> list[torch.Tensor]:
    """Every floating tensor a module's output holds: itself, or the leaves of a
    tuple/list/dict (an RNN's ``(output, h_n)``, an attention block's ``(out, weights)``,
    a ``{"logits": ...}`` output), however nested."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    leaves, _ = tree_flatten(output)
    return [leaf for leaf in leaves
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


@dataclass
class ModuleActivation:
    """One module's figures for one step, on the host."""

    kind: str  # the module's class name
    output_norm: float
    grad_norm: float | None  # None: no gradient reached its output this step
    output_nonfinite: int
    grad_nonfinite: int
    saturated: float | None  # fraction; None for modules that do not saturate

    def to_json(self) -> dict:
        data = {"kind": self.kind, "output_norm": _json_float(self.output_norm),
                "grad_norm": _json_float(self.grad_norm),
                "output_nonfinite": self.output_nonfinite,
                "grad_nonfinite": self.grad_nonfinite}
        if self.saturated is not None:
            data["saturated"] = self.saturated
        return data

    @classmethod
    def from_json(cls, data: dict) -> ModuleActivation:
        grad_norm = data.get("grad_norm")
        saturated = data.get("saturated")
        return cls(kind=str(data["kind"]), output_norm=float(data["output_norm"]),
                   grad_norm=None if grad_norm is None else float(grad_norm),
                   output_nonfinite=int(data["output_nonfinite"]),
                   grad_nonfinite=int(data["grad_nonfinite"]),
                   saturated=None if saturated is None else float(saturated))


@dataclass
class ActivationRecord:
    """A step's activation figures: ``modules`` maps each module that ran to its figures,
    in forward order; ``nonfinite_origin`` is ``{"module", "phase", "step"}`` when any
    output or ``dL/dh`` held NaN/Inf (``phase`` ``"forward"`` or ``"backward"``), else None.
    ``backward_order`` lists the modules in the order their ``dL/dh`` was computed."""

    modules: dict[str, ModuleActivation] = field(default_factory=dict)
    backward_order: list[str] = field(default_factory=list)
    nonfinite_origin: dict | None = None

    def to_json(self) -> dict:
        return {"modules": {name: m.to_json() for name, m in self.modules.items()},
                "backward_order": list(self.backward_order),
                "nonfinite_origin": self.nonfinite_origin}

    @classmethod
    def from_json(cls, data: dict) -> ActivationRecord:
        return cls(modules={name: ModuleActivation.from_json(m)
                            for name, m in data["modules"].items()},
                   backward_order=[str(name) for name in data.get("backward_order", [])],
                   nonfinite_origin=data.get("nonfinite_origin"))


# Where a step's calls stand in call order (``ActivationSnapshot.forward_calls``): the
# call sequence number of an entry, or, for an entry that folded several calls, ``FOLDED``
# and the first non-finite call's number is on the device (``ActivationSnapshot.counts``).
FOLDED = -1
# What a folded entry's first non-finite call number reads when none of its calls was.
NEVER = 2**62


@dataclass
class ActivationSnapshot:
    """One step's figures, handed from the tracker to the monitor's record path. The two
    tensors are on the device until :meth:`to_host` (non-blocking) has landed; what they
    hold, column by column, is known on the host."""

    names: list[str]
    kinds: list[str]
    forward_order: list[int]  # module slots in the order their forward first ran
    backward_order: list[int]  # slots in the order their dL/dh hooks first ran
    # One (slot, call number) per counted call, in call order: the NaN/Inf origin is the
    # slot of the first call whose count is not zero (FOLDED: see ``folded``).
    forward_calls: list[tuple[int, int]]
    backward_calls: list[tuple[int, int]]
    saturating: list[int]  # the slots of forward_order whose saturation was counted
    saturation_numel: list[int]  # the elements those counts are out of
    # float32: output norms (forward order), then dL/dh norms (backward order).
    norms: torch.Tensor
    # int64: NaN/Inf counts per call (forward_calls, then backward_calls), the saturated
    # counts (``saturating`` order), then the first non-finite call number of each
    # FOLDED entry, in the order they appear in forward_calls + backward_calls.
    counts: torch.Tensor

    def to_host(self) -> ActivationSnapshot:
        """Host copies, queued without waiting (``non_blocking`` from CUDA)."""
        if self.norms.device.type == "cpu":
            return self
        return dataclasses.replace(self, norms=self.norms.to("cpu", non_blocking=True),
                                   counts=self.counts.to("cpu", non_blocking=True))

    def has_nonfinite(self) -> bool:
        """Whether an output or dL/dh held NaN/Inf (host copies only: reads ``counts``)."""
        calls = len(self.forward_calls) + len(self.backward_calls)
        return bool(self.counts[:calls].any())

    def to_record(self, step: int) -> ActivationRecord:
        """The host figures (call once :meth:`to_host`'s copies have landed)."""
        norms, counts = self.norms.double().tolist(), self.counts.tolist()
        forward, backward = len(self.forward_order), len(self.backward_order)
        n_fwd, n_bwd = len(self.forward_calls), len(self.backward_calls)
        sat_end = n_fwd + n_bwd + len(self.saturating)
        folded_first = iter(counts[sat_end:])
        forward_first = _first_nonfinite(self.forward_calls, counts[:n_fwd], folded_first)
        backward_first = _first_nonfinite(self.backward_calls, counts[n_fwd:n_fwd + n_bwd],
                                          folded_first)
        output_nonfinite = _per_slot(self.forward_calls, counts[:n_fwd])
        grad_nonfinite = _per_slot(self.backward_calls, counts[n_fwd:n_fwd + n_bwd])
        grad_norm = dict(zip(self.backward_order, norms[forward:forward + backward]))
        saturated = {slot: count / numel if numel else 0.0 for slot, count, numel in zip(
            self.saturating, counts[n_fwd + n_bwd:sat_end], self.saturation_numel)}
        modules = {
            self.names[slot]: ModuleActivation(
                kind=self.kinds[slot], output_norm=output_norm,
                grad_norm=grad_norm.get(slot), output_nonfinite=output_nonfinite.get(slot, 0),
                grad_nonfinite=grad_nonfinite.get(slot, 0), saturated=saturated.get(slot))
            for slot, output_norm in zip(self.forward_order, norms[:forward])}
        origin = None
        if forward_first is not None:
            origin = {"module": self.names[forward_first[0]], "phase": "forward",
                      "step": step}
        elif backward_first is not None:
            slot, seq = backward_first
            origin = {"module": self.names[slot], "phase": "backward", "step": step}
            # The first dL/dh computed is the one the loss hands the model's output: clean
            # forward outputs and a non-finite gradient there mean the loss made it.
            if seq == min((s for _, s in self.backward_calls if s != FOLDED), default=None):
                origin["from_loss"] = True
        return ActivationRecord(modules, [self.names[s] for s in self.backward_order], origin)


def _per_slot(calls: list[tuple[int, int]], counts: list[int]) -> dict[int, int]:
    totals: dict[int, int] = {}
    for (slot, _), count in zip(calls, counts):
        totals[slot] = totals.get(slot, 0) + count
    return totals


def _first_nonfinite(calls, counts, folded_first) -> tuple[int, int] | None:
    """``(slot, call number)`` of the first call with a non-zero count, or None.
    ``folded_first`` yields the first non-finite call number of each FOLDED entry (and is
    advanced past this phase's ones)."""
    best = None
    for (slot, seq), count in zip(calls, counts):
        if seq == FOLDED:
            seq = next(folded_first)
        if count and (best is None or seq < best[1]):
            best = (slot, seq)
    return best


class _Figures:
    """One module's 0-d device tensors of this step, one per call, in call order, with each
    call's sequence number in the step (host ints) so NaN/Inf origins follow calls."""

    __slots__ = ("norms", "nonfinite", "seqs", "saturated", "saturation_numel",
                 "folded_first")

    def __init__(self):
        self.norms: list[torch.Tensor] = []
        self.nonfinite: list[torch.Tensor] = []
        self.seqs: list[int] = []
        self.saturated: list[torch.Tensor] = []
        self.saturation_numel = 0
        # Device int64: the first non-finite call number among folded calls (NEVER: none).
        self.folded_first: torch.Tensor | None = None

    def add(self, seq: int, norm, nonfinite, saturated=None, numel=0) -> None:
        self.norms.append(norm)
        self.nonfinite.append(nonfinite)
        self.seqs.append(seq)
        if saturated is not None:
            self.saturated.append(saturated)
            self.saturation_numel += numel
        if len(self.norms) > MAX_PENDING_CALLS:
            self._fold()

    def _fold(self) -> None:
        # Rare (see MAX_PENDING_CALLS): the order of the folded calls is kept on the device,
        # as the number of the first one that held NaN/Inf. The call numbers go up as a
        # non-blocking copy (no wait for the device).
        counts = torch.stack(self.nonfinite)
        seqs = [NEVER if s == FOLDED else s for s in self.seqs]
        numbers = torch.tensor(seqs, dtype=torch.int64).to(counts.device, non_blocking=True)
        if self.folded_first is not None and FOLDED in self.seqs:
            numbers[self.seqs.index(FOLDED)] = self.folded_first
        first = torch.where(counts > 0, numbers, NEVER).amin()
        self.norms, self.nonfinite = [self.norm()], [counts.sum()]
        self.seqs, self.folded_first = [FOLDED], first
        if self.saturated:
            self.saturated = [self.saturated_count()]

    # Several calls in a step: the norm of all outputs together (the norm of the norms),
    # counts summed. Device ops only.
    def norm(self) -> torch.Tensor:
        if len(self.norms) == 1:
            return self.norms[0]
        return torch.linalg.vector_norm(torch.stack(self.norms))

    def saturated_count(self) -> torch.Tensor:
        return self.saturated[0] if len(self.saturated) == 1 else torch.stack(
            self.saturated).sum()


class ActivationTracker:
    """Forward hooks on ``model``'s leaf modules, and tensor hooks on their outputs, that
    keep each step's figures as device tensors (see the module docstring).

    Args:
        model (nn.Module): the model; its leaf modules at construction are hooked (and
            again at each :meth:`rehook`).

    :meth:`take` returns the step's :class:`ActivationSnapshot` (None when no tracked
    forward ran) and starts the next step; :meth:`remove` takes every hook off.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"activation tracking needs an nn.Module, got {type(model).__name__}")
        self._handles: list = []
        self._generation = 0
        self._removed = False
        self.rehook(model)
        self._start_step()

    def rehook(self, model: nn.Module) -> None:
        """Hook ``model``'s leaf modules as they are now: the monitor calls this when the
        model's tree changed (a layer added, replaced or deleted). Hooks come off the
        modules no longer in it; tensor hooks of the old layout record nothing more."""
        for handle in self._handles:
            handle.remove()
        self._generation += 1  # closures of the old layout see a different number
        leaves = leaf_modules(model)
        # New lists, never mutated: snapshots already taken keep reading the old ones.
        self.names = [name for name, _ in leaves]
        self.kinds = [type(module).__name__ for _, module in leaves]
        self._ranges = [_saturation_range(module) for _, module in leaves]
        self._handles = [module.register_forward_hook(self._forward_hook(slot))
                         for slot, (_, module) in enumerate(leaves)]

    def _start_step(self) -> None:
        # Dicts keep insertion order: the modules' first-call orders come for free.
        self._outputs: dict[int, _Figures] = {}
        self._grads: dict[int, _Figures] = {}
        self._calls = 0  # forward and gradient hook calls so far this step

    def _next_call(self) -> int:
        self._calls += 1
        return self._calls

    def _forward_hook(self, slot: int) -> Callable:
        generation = self._generation

        def hook(module, inputs, output):
            if (self._removed or generation != self._generation
                    or not torch.is_grad_enabled()):
                return None
            self._on_output(slot, _floating_tensors(output))
            return None
        return hook

    def _on_output(self, slot: int, outputs: list[torch.Tensor]) -> None:
        if not outputs:
            return
        figures = self._outputs.get(slot) or self._outputs.setdefault(slot, _Figures())
        bounds = self._ranges[slot]
        if len(outputs) == 1:  # the usual case, without the lists (host time per call)
            values = outputs[0].detach()
            figures.add(self._next_call(), _norm(values), _nonfinite(values),
                        None if bounds is None else _saturated(values, bounds), values.numel())
        else:
            values = [output.detach() for output in outputs]
            saturated = None if bounds is None else _combined_count(
                [_saturated(v, bounds) for v in values])
            figures.add(self._next_call(), _combined_norm([_norm(v) for v in values]),
                        _combined_count([_nonfinite(v) for v in values]), saturated,
                        sum(v.numel() for v in values))
        for output in outputs:
            if output.requires_grad:
                output.register_hook(self._grad_hook(slot))

    def _grad_hook(self, slot: int) -> Callable:
        generation = self._generation

        def hook(grad):
            if self._removed or generation != self._generation or grad is None:
                return None
            figures = self._grads.get(slot) or self._grads.setdefault(slot, _Figures())
            values = grad.detach()
            figures.add(self._next_call(), _norm(values), _nonfinite(values))
            return None  # the gradient itself is left as it is
        return hook

    def take(self) -> ActivationSnapshot | None:
        """This step's figures (device tensors), and a fresh start for the next step."""
        outputs, grads = self._outputs, self._grads
        self._start_step()
        if not outputs:
            return None
        device = next(iter(outputs.values())).norms[0].device

        def on_device(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            # A model spread over devices (rare): gathered on the first module's device.
            return [t if t.device == device else t.to(device, non_blocking=True)
                    for t in tensors]

        def calls(figures: dict[int, _Figures]):
            entries = sorted(((seq, slot, count) for slot, f in figures.items()
                              for seq, count in zip(f.seqs, f.nonfinite)),
                             key=lambda e: (e[0] == FOLDED, e[0]))
            return [(slot, seq) for seq, slot, _ in entries], [c for _, _, c in entries]
        forward_calls, forward_counts = calls(outputs)
        backward_calls, backward_counts = calls(grads)
        folded = [figures.folded_first for phase, calls_ in
                  ((outputs, forward_calls), (grads, backward_calls))
                  for slot, seq in calls_ if seq == FOLDED
                  for figures in (phase[slot],)]
        saturating = [slot for slot, figures in outputs.items() if figures.saturated]
        norms = on_device([f.norm() for f in outputs.values()]
                          + [f.norm() for f in grads.values()])
        counts = on_device(forward_counts + backward_counts
                           + [outputs[slot].saturated_count() for slot in saturating]
                           + folded)
        return ActivationSnapshot(
            names=self.names, kinds=self.kinds, forward_order=list(outputs),
            backward_order=list(grads), forward_calls=forward_calls,
            backward_calls=backward_calls, saturating=saturating,
            saturation_numel=[outputs[slot].saturation_numel for slot in saturating],
            norms=torch.stack(norms).float(), counts=torch.stack(counts))

    def remove(self) -> None:
        """Take every hook off (safe twice). Tensor hooks still pending on a graph not yet
        backpropagated stay registered there but record nothing."""
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _combined_norm(norms: list[torch.Tensor]) -> torch.Tensor:
    # Several tensors in one output: the norm of all of them together.
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def _combined_count(counts: list[torch.Tensor]) -> torch.Tensor:
    return counts[0] if len(counts) == 1 else torch.stack(counts).sum()


def _norm(values: torch.Tensor) -> torch.Tensor:
    # Accumulated in float32 whatever the dtype (no float32 copy of a bf16 tensor).
    return torch.linalg.vector_norm(values, dtype=torch.float32)


def _nonfinite(values: torch.Tensor) -> torch.Tensor:
    # x - x is 0 for every finite x and NaN for NaN and +-Inf: one subtraction and a
    # count, three times faster on CPU than isfinite (which compares twice).
    return torch.count_nonzero(values - values)


def _saturated(values: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    # |y - centre| >= half-width - margin: within the margin of either bound.
    low, high = bounds
    centre, half_width = (low + high) / 2, (high - low) / 2
    distance = values.abs() if centre == 0 else (values - centre).abs_()
    return torch.count_nonzero(distance.ge_(half_width - SATURATION_MARGIN))


def _json_float(value: float | None):
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
