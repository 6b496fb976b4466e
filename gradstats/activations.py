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

The hooks only queue device ops (a norm, a count, an in-place add into a preallocated slot
of the step's buffers); which modules ran, and in which order forward and backward, is
known on the host for free, since the hooks run in host code. :meth:`ActivationTracker.take`
hands the step's buffers to the monitor, which copies them to the host with the gradient
statistics (``record_queue``); there :meth:`ActivationSnapshot.to_record` names where a
NaN/Inf was born: the first module in forward order whose output went non-finite, or, when
the forward pass was clean, the first in backward order whose ``dL/dh`` did.

Forward passes run with gradients disabled (evaluation) are not recorded. Limits: modules
added to the model after the tracker was made are not hooked; with activation
checkpointing the recomputed forward is counted again; under ``GradScaler`` the gradient
figures are of the scaled loss.
"""
from __future__ import annotations

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

# Rows of the float buffer (sums of squares) and of the count buffer, one column per module.
_OUTPUT_SUMSQ, _GRAD_SUMSQ = 0, 1
_OUTPUT_NONFINITE, _GRAD_NONFINITE, _SATURATED, _SATURATION_NUMEL = 0, 1, 2, 3
_COUNT_ROWS = 4


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
    """One step's buffers, handed from the tracker to the monitor's record path. The
    tensors are on the device until :meth:`to_host` (non-blocking) has landed."""

    names: list[str]
    kinds: list[str]
    saturating: list[bool]
    forward_order: list[int]  # module slots in the order their forward ran (first call)
    backward_order: list[int]  # slots in the order their dL/dh hooks ran (first call)
    sums: torch.Tensor  # [2, n] float64: sums of squares of outputs and of dL/dh
    counts: torch.Tensor  # [4, n] int64: the non-finite and saturation counts

    def to_host(self) -> ActivationSnapshot:
        """Host copies, queued without waiting (pinned, ``non_blocking``, from CUDA)."""
        if self.sums.device.type == "cpu":
            return self
        return ActivationSnapshot(
            self.names, self.kinds, self.saturating, self.forward_order, self.backward_order,
            self.sums.to("cpu", non_blocking=True), self.counts.to("cpu", non_blocking=True))

    def to_record(self, step: int) -> ActivationRecord:
        """The host figures (call once :meth:`to_host`'s copies have landed)."""
        sums, counts = self.sums.double().tolist(), self.counts.tolist()
        backward = set(self.backward_order)
        modules = {}
        for slot in self.forward_order:
            numel = counts[_SATURATION_NUMEL][slot]
            modules[self.names[slot]] = ModuleActivation(
                kind=self.kinds[slot],
                output_norm=math.sqrt(sums[_OUTPUT_SUMSQ][slot]),
                grad_norm=math.sqrt(sums[_GRAD_SUMSQ][slot]) if slot in backward else None,
                output_nonfinite=counts[_OUTPUT_NONFINITE][slot],
                grad_nonfinite=counts[_GRAD_NONFINITE][slot],
                saturated=(counts[_SATURATED][slot] / numel
                           if self.saturating[slot] and numel else None))
        return ActivationRecord(modules, [self.names[s] for s in self.backward_order],
                                self._origin(counts, step))

    def _origin(self, counts: list[list[int]], step: int) -> dict | None:
        for slot in self.forward_order:
            if counts[_OUTPUT_NONFINITE][slot]:
                return {"module": self.names[slot], "phase": "forward", "step": step}
        for slot in self.backward_order:
            if counts[_GRAD_NONFINITE][slot]:
                return {"module": self.names[slot], "phase": "backward", "step": step}
        return None


class ActivationTracker:
    """Forward hooks on ``model``'s leaf modules, and tensor hooks on their outputs, that
    accumulate each step's figures into device buffers (see the module docstring).

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
        self._sums: torch.Tensor | None = None  # allocated by the step's first hook
        self._counts: torch.Tensor | None = None
        self._forward_order: list[int] = []
        self._backward_order: list[int] = []
        self._forward_seen: set[int] = set()
        self._backward_seen: set[int] = set()

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sums is None:
            # Fresh buffers per step (a few hundred bytes): the previous step's may still be
            # on their way to the host. MPS has no float64.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._sums = torch.zeros(2, len(self.names), dtype=dtype, device=device)
            self._counts = torch.zeros(_COUNT_ROWS, len(self.names), dtype=torch.int64,
                                       device=device)
        return self._sums, self._counts

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
        sums, counts = self._buffers(values.device)
        values_on = values if values.device == sums.device else values.to(
            sums.device, non_blocking=True)  # a model spread over devices: rare
        # Device ops only: accumulated into this module's column, nothing read back.
        sums[_OUTPUT_SUMSQ, slot].add_(_sumsq(values_on, sums.dtype))
        counts[_OUTPUT_NONFINITE, slot].add_(_nonfinite(values_on))
        bounds = self._ranges[slot]
        if bounds is not None:
            counts[_SATURATED, slot].add_(_saturated(values_on, bounds))
            counts[_SATURATION_NUMEL, slot].add_(values_on.numel())
        if slot not in self._forward_seen:
            self._forward_seen.add(slot)
            self._forward_order.append(slot)
        if output.requires_grad:
            output.register_hook(self._grad_hook(slot))

    def _grad_hook(self, slot: int) -> Callable:
        def hook(grad):
            if self._removed or grad is None:
                return None
            sums, counts = self._buffers(grad.device)
            grad_on = grad if grad.device == sums.device else grad.to(
                sums.device, non_blocking=True)
            sums[_GRAD_SUMSQ, slot].add_(_sumsq(grad_on.detach(), sums.dtype))
            counts[_GRAD_NONFINITE, slot].add_(_nonfinite(grad_on))
            if slot not in self._backward_seen:
                self._backward_seen.add(slot)
                self._backward_order.append(slot)
            return None  # the gradient itself is left as it is
        return hook

    def take(self) -> ActivationSnapshot | None:
        """This step's figures (device tensors), and a fresh start for the next step."""
        if self._sums is None:
            self._start_step()
            return None
        snapshot = ActivationSnapshot(
            list(self.names), list(self.kinds), [r is not None for r in self._ranges],
            self._forward_order, self._backward_order, self._sums, self._counts)
        self._start_step()
        return snapshot

    def remove(self) -> None:
        """Take every hook off (safe twice). Tensor hooks still pending on a graph not yet
        backpropagated stay registered there but record nothing."""
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _sumsq(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The norm in float32 (no float32 copy of a bf16 tensor) and squared in float64, so a
    # norm up to float32's range squares without overflow.
    norm = torch.linalg.vector_norm(values, dtype=torch.float32)
    return norm.to(dtype).square()


def _nonfinite(values: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(values).logical_not_().sum()


def _saturated(values: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    low, high = bounds
    return ((values <= low + SATURATION_MARGIN) | (values >= high - SATURATION_MARGIN)).sum()


def _json_float(value: float | None):
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
