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

The hooks only queue device ops (a norm and a count or two per call, kept as 0-d device
tensors); which modules ran, and in which order forward and backward, is known on the host
for free, since the hooks run in host code. :meth:`ActivationTracker.take` stacks the step's
figures into two small device tensors and hands them to the monitor, which copies them to
the host with the gradient statistics (``record_queue``); there
:meth:`ActivationSnapshot.to_record` names where a NaN/Inf was born: the first module in
forward order whose output went non-finite, or, when the forward pass was clean, the first
in backward order whose ``dL/dh`` did.

Forward passes run with gradients disabled (evaluation) are not recorded. Limits: modules
added to the model after the tracker was made are not hooked; with activation
checkpointing the recomputed forward is counted again; under ``GradScaler`` the gradient
figures are of the scaled loss.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ActivationTracker", "ActivationRecord", "SATURATING", "SATURATION_MARGIN"]

# How close to a bound of its range an output counts as saturated. 0.01: tanh' = 1 - y^2 is
# below 0.02 (2% of its peak) at |y| > 0.99, sigmoid' = y (1 - y) below 0.01 (4% of its peak)
# within 0.01 of 0 or 1: a unit there passes almost no gradient back.
SATURATION_MARGIN = 0.01

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


def _first_tensor(output) -> torch.Tensor | None:
    """The tensor a module's output stands for: itself, or the first floating tensor of a
    tuple/list (an RNN's output sequence, an attention block's output before its weights)."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    return None


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


@dataclass
class ActivationSnapshot:
    """One step's figures, handed from the tracker to the monitor's record path. The two
    tensors are on the device until :meth:`to_host` (non-blocking) has landed; what they
    hold, column by column, is known on the host."""

    names: list[str]
    kinds: list[str]
    forward_order: list[int]  # module slots in the order their forward ran (first call)
    backward_order: list[int]  # slots in the order their dL/dh hooks ran (first call)
    saturating: list[int]  # the slots of forward_order whose saturation was counted
    saturation_numel: list[int]  # the elements those counts are out of
    # float32: output norms (forward order), then dL/dh norms (backward order).
    norms: torch.Tensor
    # int64: output NaN/Inf counts (forward order), dL/dh counts (backward order), then the
    # saturated counts (``saturating`` order).
    counts: torch.Tensor

    def to_host(self) -> ActivationSnapshot:
        """Host copies, queued without waiting (``non_blocking`` from CUDA)."""
        if self.norms.device.type == "cpu":
            return self
        return dataclasses.replace(self, norms=self.norms.to("cpu", non_blocking=True),
                                   counts=self.counts.to("cpu", non_blocking=True))

    def to_record(self, step: int) -> ActivationRecord:
        """The host figures (call once :meth:`to_host`'s copies have landed)."""
        norms, counts = self.norms.double().tolist(), self.counts.tolist()
        forward, backward = len(self.forward_order), len(self.backward_order)
        output_nonfinite = dict(zip(self.forward_order, counts[:forward]))
        grad_nonfinite = dict(zip(self.backward_order, counts[forward:forward + backward]))
        grad_norm = dict(zip(self.backward_order, norms[forward:]))
        saturated = {slot: count / numel if numel else 0.0 for slot, count, numel in zip(
            self.saturating, counts[forward + backward:], self.saturation_numel)}
        modules = {
            self.names[slot]: ModuleActivation(
                kind=self.kinds[slot], output_norm=output_norm,
                grad_norm=grad_norm.get(slot), output_nonfinite=output_nonfinite[slot],
                grad_nonfinite=grad_nonfinite.get(slot, 0), saturated=saturated.get(slot))
            for slot, output_norm in zip(self.forward_order, norms[:forward])}
        origin = None
        first_forward = next((s for s in self.forward_order if output_nonfinite[s]), None)
        first_backward = next((s for s in self.backward_order if grad_nonfinite[s]), None)
        if first_forward is not None:
            origin = {"module": self.names[first_forward], "phase": "forward", "step": step}
        elif first_backward is not None:
            origin = {"module": self.names[first_backward], "phase": "backward", "step": step}
        return ActivationRecord(modules, [self.names[s] for s in self.backward_order], origin)


# A module called more often than this in one step (an RNN cell over a long sequence, a
# step() that never comes) has its figures folded into one, so memory stays bounded.
MAX_PENDING_CALLS = 64


class _Figures:
    """One module's 0-d device tensors of this step, one per call, in call order."""

    __slots__ = ("norms", "nonfinite", "saturated", "saturation_numel")

    def __init__(self):
        self.norms: list[torch.Tensor] = []
        self.nonfinite: list[torch.Tensor] = []
        self.saturated: list[torch.Tensor] = []
        self.saturation_numel = 0

    def add(self, norm, nonfinite, saturated=None, numel=0) -> None:
        self.norms.append(norm)
        self.nonfinite.append(nonfinite)
        if saturated is not None:
            self.saturated.append(saturated)
            self.saturation_numel += numel
        if len(self.norms) > MAX_PENDING_CALLS:
            self.norms, self.nonfinite = [self.norm()], [self.nonfinite_count()]
            if self.saturated:
                self.saturated = [self.saturated_count()]

    # Several calls in a step: the norm of all outputs together (the norm of the norms),
    # counts summed. Device ops only.
    def norm(self) -> torch.Tensor:
        if len(self.norms) == 1:
            return self.norms[0]
        return torch.linalg.vector_norm(torch.stack(self.norms))

    def nonfinite_count(self) -> torch.Tensor:
        return self.nonfinite[0] if len(self.nonfinite) == 1 else torch.stack(
            self.nonfinite).sum()

    def saturated_count(self) -> torch.Tensor:
        return self.saturated[0] if len(self.saturated) == 1 else torch.stack(
            self.saturated).sum()


class ActivationTracker:
    """Forward hooks on ``model``'s leaf modules, and tensor hooks on their outputs, that
    keep each step's figures as device tensors (see the module docstring).

    Args:
        model (nn.Module): the model; its leaf modules at construction are hooked.

    :meth:`take` returns the step's :class:`ActivationSnapshot` (None when no tracked
    forward ran) and starts the next step; :meth:`remove` takes every hook off.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"activation tracking needs an nn.Module, got {type(model).__name__}")
        leaves = leaf_modules(model)
        self.names = [name for name, _ in leaves]
        self.kinds = [type(module).__name__ for _, module in leaves]
        self._ranges = [_saturation_range(module) for _, module in leaves]
        self._handles = [module.register_forward_hook(self._forward_hook(slot))
                         for slot, (_, module) in enumerate(leaves)]
        self._removed = False
        self._start_step()

    def _start_step(self) -> None:
        # Dicts keep insertion order: the forward and backward orders come for free.
        self._outputs: dict[int, _Figures] = {}
        self._grads: dict[int, _Figures] = {}

    def _forward_hook(self, slot: int) -> Callable:
        def hook(module, inputs, output):
            if self._removed or not torch.is_grad_enabled():
                return None
            self._on_output(slot, _first_tensor(output))
            return None
        return hook

    def _on_output(self, slot: int, output: torch.Tensor | None) -> None:
        if output is None:
            return
        values = output.detach()
        figures = self._outputs.get(slot) or self._outputs.setdefault(slot, _Figures())
        bounds = self._ranges[slot]
        figures.add(_norm(values), _nonfinite(values),
                    None if bounds is None else _saturated(values, bounds), values.numel())
        if output.requires_grad:
            output.register_hook(self._grad_hook(slot))

    def _grad_hook(self, slot: int) -> Callable:
        def hook(grad):
            if self._removed or grad is None:
                return None
            figures = self._grads.get(slot) or self._grads.setdefault(slot, _Figures())
            values = grad.detach()
            figures.add(_norm(values), _nonfinite(values))
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
        saturating = [slot for slot, figures in outputs.items() if figures.saturated]
        norms = on_device([f.norm() for f in outputs.values()]
                          + [f.norm() for f in grads.values()])
        counts = on_device([f.nonfinite_count() for f in outputs.values()]
                           + [f.nonfinite_count() for f in grads.values()]
                           + [outputs[slot].saturated_count() for slot in saturating])
        return ActivationSnapshot(
            names=self.names, kinds=self.kinds, forward_order=list(outputs),
            backward_order=list(grads), saturating=saturating,
            saturation_numel=[outputs[slot].saturation_numel for slot in saturating],
            norms=torch.stack(norms).float(), counts=torch.stack(counts))

    def remove(self) -> None:
        """Take every hook off (safe twice). Tensor hooks still pending on a graph not yet
        backpropagated stay registered there but record nothing."""
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []


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
