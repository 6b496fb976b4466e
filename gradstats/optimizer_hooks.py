"""The monitor's hold on an optimizer: running the monitor at ``optimizer.step()``
(``attach``) and making a step a no-op for ``on_nonfinite="skip"``, with or without a
closure.

Without a closure the gradients are final when ``optimizer.step()`` starts: the step
pre-hook runs the monitor (``attach``) and arms the skip decided by the last
``monitor.step()``. With a closure (``optimizer.step(closure)``: Lightning's automatic
optimization, LBFGS) the gradients do not exist yet when the pre-hook runs: it replaces the
closure by one that calls it, then runs the monitor on the gradients it just made and arms
the skip, all before the optimizer reads them. Either way the post-hook undoes the skip.

An optimizer subclass whose ``step`` calls ``super().step()`` runs torch's step hooks twice,
the second time inside the first (torch wraps each class's ``step``). Only the outer call is
the update: the hooks recognise the inner one by an outer step call of the same optimizer on
the stack, and leave it alone, so the monitor runs once and the skip stays armed.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


class OptimizerHooks:
    """Pre/post step hooks on ``optimizer``.

    Args:
        optimizer: the optimizer to hook (see :func:`hookable`).
        skipping: whether ``on_nonfinite="skip"`` is on.

    Attributes:
        auto_step: set by ``attach``: called with GradScaler's ``found_inf`` for this step
            (or None) to run the monitor at every optimizer step. None: the user calls
            ``monitor.step()`` (``optimizer=``).
        pending_skip: set by ``monitor.step()`` under ``"skip"``: the device flag of the
            gradients it judged, armed for the next optimizer update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, skipping: bool):
        self.optimizer = optimizer
        self.skipping = skipping
        self.auto_step: Callable[[torch.Tensor | None], None] | None = None
        self.pending_skip: torch.Tensor | None = None  # "skip": the last step's flag, on device
        self._armed: ArmedSkip | None = None  # the skip set up for the step under way
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    def remove(self) -> None:
        """Take the hooks off (and put back a skip armed for a step that never finished)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._disarm(after_failure=True)

    def _before_step(self, optimizer, args, kwargs):
        if _inside_own_step(optimizer):
            return None  # super().step() of a subclass: the outer call is the update
        self._disarm(after_failure=True)  # armed still: the last step raised before its end
        closure = _closure_of(args, kwargs)
        if closure is None:
            if self.auto_step is not None:
                self._run_auto_step(optimizer)
            self._arm_skip(optimizer)
            return None
        if self.pending_skip is not None:
            self.pending_skip = None
            raise RuntimeError(
                "gradstats: monitor.step() ran before optimizer.step(closure), whose closure "
                "recomputes the gradients it judged; call monitor.step() inside the closure, "
                "after backward (or use monitor.attach(optimizer))")
        if self.auto_step is None and not self.skipping:
            return None
        if self.skipping and isinstance(optimizer, torch.optim.LBFGS):
            raise RuntimeError(
                "gradstats: on_nonfinite='skip' cannot skip an LBFGS step: it evaluates its "
                "closure several times and updates the parameters in between (and treats "
                "missing gradients as zeros); use on_nonfinite='raise' or 'warn'")
        return _with_closure(args, kwargs, self._monitored(optimizer, closure))

    def _monitored(self, optimizer, closure: Callable):
        calls = 0

        def monitored_closure():
            nonlocal calls
            calls += 1
            if calls > 1 and self.skipping:
                self._disarm()  # our error: the gradients hidden for this step come back
                raise RuntimeError(
                    "gradstats: on_nonfinite='skip' cannot skip an optimizer step that "
                    "evaluates its closure more than once; use on_nonfinite='raise' or 'warn'")
            loss = closure()
            # The gradients of this step exist only now: monitor them, then arm the skip
            # (also one decided by a monitor.step() the closure itself called).
            if self.auto_step is not None:
                self._run_auto_step(optimizer)
            self._arm_skip(optimizer)
            return loss

        return monitored_closure

    def _run_auto_step(self, optimizer) -> None:
        if getattr(optimizer, "grad_scale", None) is not None:
            raise RuntimeError(
                "gradstats: the gradients are still multiplied by GradScaler's scale; "
                "call scaler.unscale_(optimizer) before scaler.step(optimizer) so the "
                "monitor sees (and clips) the true gradients")
        # Set by GradScaler for this very step (fused optimizers only).
        self.auto_step(getattr(optimizer, "found_inf", None))

    def _arm_skip(self, optimizer) -> None:
        found_inf, self.pending_skip = self.pending_skip, None
        if found_inf is not None:
            self._armed = skip_if_found(optimizer, found_inf)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if _inside_own_step(optimizer):
            return  # the inner call of a subclass's super().step(): the update goes on
        self._disarm()

    def _disarm(self, after_failure: bool = False) -> None:
        armed, self._armed = self._armed, None
        if armed is not None and (armed.restore_after_failure or not after_failure):
            armed.restore()


@dataclass
class ArmedSkip:
    """What a skip changed on the optimizer for one step, and how to put it back."""

    restore: Callable[[], None]
    # When the step raised before the post-hook ran: a device flag left on the optimizer
    # would skip every later update, so it is put back at the next step (or close); hidden
    # gradients are not, since the next backward has made new ones by then.
    restore_after_failure: bool


def _inside_own_step(optimizer) -> bool:
    """Whether a hook of ``optimizer`` runs inside another (outer) step call of it: a torch
    step wrapper frame, above the one that called the hook, whose ``self`` is ``optimizer``.
    Stateless: nothing is kept across steps (a step that raised leaves no frame behind)."""
    wrapper = sys._getframe(2)  # hook <- _inside_own_step; [2] is torch's wrapper
    frame = wrapper.f_back
    while frame is not None:
        if frame.f_code is wrapper.f_code and frame.f_locals.get("self") is optimizer:
            return True
        frame = frame.f_back
    return False


def hookable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step()`` runs torch's step hooks. Wrappers that subclass
    ``Optimizer`` without its hook machinery (accelerate's ``AcceleratedOptimizer``) are
    looked through to the optimizer they call."""
    while (not hasattr(optimizer, "_optimizer_step_pre_hooks")
           and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)):
        optimizer = optimizer.optimizer
    return optimizer


def _closure_of(args: tuple, kwargs: dict):
    """The closure of ``optimizer.step(...)`` (``args`` starts with the optimizer). A None
    closure is no closure: ``AcceleratedOptimizer.step`` passes ``None`` positionally."""
    return args[1] if len(args) > 1 else kwargs.get("closure")


def _with_closure(args: tuple, kwargs: dict, closure: Callable) -> tuple[tuple, dict]:
    if len(args) > 1:
        return (args[0], closure, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure}


def skip_if_found(optimizer: torch.optim.Optimizer,
                  found_inf: torch.Tensor) -> ArmedSkip | None:
    """Make this ``optimizer.step()`` a no-op when ``found_inf`` is non-zero; returns how to
    undo the arrangement after the step (or None)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # Fused optimizers skip on the device when `found_inf` != 0 (GradScaler's protocol):
        # no sync. GradScaler may have set its own flag already; either one skips.
        # The flag must be exactly 0 or 1: the fused kernels also subtract it from the
        # step counts they incremented.
        previous = getattr(optimizer, "found_inf", None)
        optimizer.found_inf = found_inf if previous is None else torch.maximum(
            previous, found_inf.to(previous.device, previous.dtype))

        combined = optimizer.found_inf

        def restore_found_inf():
            if optimizer.__dict__.get("found_inf") is not combined:
                return  # GradScaler (or the user) has set this step's own flag since
            if previous is None:
                del optimizer.found_inf
            else:
                optimizer.found_inf = previous
        return ArmedSkip(restore_found_inf, restore_after_failure=True)
    # Other optimizers read gradients on the host side of their loop: the decision needs
    # the flag here (the one sync of this mode). A parameter without .grad is not updated
    # (nor is its state), so hiding every gradient makes the step a no-op.
    if not bool(found_inf):
        return None
    hidden = [(p, p.grad) for group in optimizer.param_groups for p in group["params"]]
    for param, _ in hidden:
        param.grad = None

    def restore_grads():
        for param, grad in hidden:
            param.grad = grad
    return ArmedSkip(restore_grads, restore_after_failure=False)
