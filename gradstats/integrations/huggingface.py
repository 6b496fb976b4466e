"""``GradStatsCallback`` for the Hugging Face ``transformers.Trainer``: gradstats' fused pass
at every optimizer step, reported through the Trainer's own ``report_to`` integrations."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..checks import non_negative_float
from ..monitor import GradMonitor
from ..record import StepRecord
from ..sinks import sink_specs
from ._options import check_monitor_options

__all__ = ["GradStatsCallback"]


class GradStatsCallback(TrainerCallback):
    r"""Per-step gradient statistics (norms, NaN/Inf counts, log2 histograms; per parameter
    and per module) from one fused pass, added to the Trainer's logs (so ``report_to``:
    TensorBoard, W&B, MLflow... and ``trainer.state.log_history`` get them) and written to
    gradstats sinks; optionally the gradient clipping from the same pass.

    The pass runs in ``on_pre_optimizer_step``. In transformers 5.x
    ``Trainer._run_epoch`` does, on the micro-batch that completes an update
    (``do_sync_step``): ``_clip_grad_norm(model)`` (``accelerator.clip_grad_norm_`` to
    ``max_grad_norm``, when ``max_grad_norm > 0``), ``_get_grad_norm`` (the same call with
    ``inf`` when it did not clip), ``on_pre_optimizer_step``, ``optimizer.step()``,
    ``on_optimizer_step``, ``model.zero_grad()``, ``global_step += 1``, ``on_step_end``, then
    ``_maybe_log_save_evaluate`` -> ``log`` -> ``on_log``. So the statistics describe the
    gradients of one whole update (every micro-batch accumulated), *after* the Trainer's
    clip. To see them before clipping and clip in the same pass, set
    ``TrainingArguments(max_grad_norm=0)`` (0 disables the Trainer's clip; ``None`` is not
    accepted by 5.x, which compares it with 0) and ``max_norm`` here.

    Steps are the Trainer's: the update made while ``state.global_step`` is ``N`` is step
    ``N + 1``, the step the Trainer logs its ``loss`` and ``grad_norm`` for that update at.
    In ``on_log`` the record of the step being logged is added to ``logs`` (keys
    ``grad_norm/total``, ``grad_nonfinite/total``, ``grad_norm/clip_coef`` with ``max_norm``,
    ``grad_norm/module/<name>``, ``grad_nonfinite/module/<name>``; TensorBoard shows them
    under ``train/``). Callbacks run in list order and ``Trainer(callbacks=[...])`` puts
    them after the ``report_to`` ones, so add this one with :meth:`add_to`, which puts it
    first. The Trainer has synchronised with the device before ``on_log`` (``loss.item()``),
    so waiting there for the record costs nothing more.

    Args:
        log_every (int, optional): make a record of the steps that are multiples of
            ``log_every``; the Trainer's logs get the record of the step they log, when
            there is one. Default: the Trainer's ``logging_steps`` when it logs by steps
            (so every step it logs has a record), else 1
        hist_every (int, optional): add histograms (to gradstats sinks) every ``hist_every``
            steps. Default: None
        sinks: gradstats sinks (``"jsonl:PATH"``, ``"tensorboard:DIR"``, objects with
            ``write(record)``...), written by the main process only. Default: none
        on_nonfinite (str or callable): as for :class:`gradstats.GradMonitor`. ``"raise"``
            raises ``RuntimeError`` out of ``trainer.train()`` before the optimizer step;
            ``"skip"`` makes that optimizer step leave the weights unchanged (the Trainer
            still counts it and steps its LR scheduler). Warnings, errors and a callable
            name the Trainer's step. By the time this callback runs, torch's clip has
            made every gradient NaN once one is: the Trainer's clip (or, with
            ``max_grad_norm=0``, its ``grad_norm``, measured by the same call with
            ``max_norm=inf``) scales all of them by ``max_norm / nan``. Run
            ``trainer.train()`` under :func:`gradstats.route_torch_clipping` and that call
            is gradstats', which leaves the gradients alone at ``max_norm=inf``: the alarm
            then names the parameter that went non-finite. Default: ``"warn"``
        norm_type (float): order of the norms. Default: 2.0
        max_norm (float, optional): clip the gradients to this total norm from the same
            pass; set ``TrainingArguments(max_grad_norm=0)`` so the Trainer does not clip
            first (a warning says so otherwise).
        num_bins, min_exp (int): histogram layout, as for :func:`gradstats.grad_stats`.
        report (bool): add the scalars to the Trainer's logs. Default: True
        report_modules (bool): include the per-module scalars in the Trainer's logs (they
            are also printed to the console by its printer/progress callback); gradstats
            sinks always get them. Default: True

    Example::

        >>> from gradstats.integrations.huggingface import GradStatsCallback
        >>> args = TrainingArguments("out", max_grad_norm=0, report_to=["tensorboard"])
        >>> trainer = Trainer(model, args, train_dataset=data)
        >>> GradStatsCallback(max_norm=1.0).add_to(trainer)
        >>> trainer.train()
    """

    def __init__(
        self,
        *,
        log_every: int | None = None,
        hist_every: int | None = None,
        sinks: Sequence | str | object | None = None,
        on_nonfinite: str | Callable[[int, dict[str, int]], None] = "warn",
        norm_type: float = 2.0,
        max_norm: float | None = None,
        num_bins: int = 64,
        min_exp: int = -40,
        report: bool = True,
        report_modules: bool = True,
    ):
        self.log_every = log_every
        self.options = dict(hist_every=hist_every, norm_type=norm_type, num_bins=num_bins,
                            min_exp=min_exp, on_nonfinite=on_nonfinite)
        check_monitor_options(log_every=1 if log_every is None else log_every, **self.options)
        self.max_norm = None if max_norm is None else non_negative_float("max_norm", max_norm)
        self.sinks, self.on_nonfinite = sinks, on_nonfinite
        self.report, self.report_modules = report, report_modules
        self._placed = False  # by add_to, before the report_to callbacks
        self.monitor: GradMonitor | None = None
        self._latest: _LatestRecord | None = None
        self._reported_step: int | None = None

    def add_to(self, trainer: Trainer) -> GradStatsCallback:
        """Put this callback first in ``trainer``'s callbacks (moving it if it is there), so
        that its ``on_log`` adds the statistics before the ``report_to`` callbacks and the
        printer/progress callback read the logs. Returns ``self``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._placed = True
        return self

    # -- events -------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model=None, optimizer=None, **kwargs) -> None:
        self._close()  # a monitor left by an earlier train()
        if self.report and args.report_to and not self._placed:
            warnings.warn(
                "GradStatsCallback was not added with GradStatsCallback(...).add_to(trainer): "
                "Trainer(callbacks=[...]) and trainer.add_callback() run it after the report_to "
                f"callbacks ({', '.join(args.report_to)}), which then log without the gradient "
                "statistics (trainer.state.log_history and gradstats sinks still get them)",
                UserWarning, stacklevel=2)
        if args.max_grad_norm is None:  # transformers 5.x compares it with 0 at every update
            raise ValueError("TrainingArguments(max_grad_norm=None) fails in the Trainer's "
                             "update ('>' between None and int); max_grad_norm=0 turns its "
                             "clipping off")
        if self.max_norm is not None and args.max_grad_norm:
            warnings.warn(
                f"GradStatsCallback(max_norm={self.max_norm}) clips, and the Trainer clips "
                f"first to max_grad_norm={args.max_grad_norm}: the gradients are clipped twice "
                "and the statistics are of the Trainer's clipped gradients. Set "
                "TrainingArguments(max_grad_norm=0) to clip once, in gradstats' pass",
                UserWarning, stacklevel=2)
        # "skip" hooks the Trainer's optimizer (GradMonitor looks through accelerate's
        # AcceleratedOptimizer to the torch optimizer whose step() runs the hooks).
        skipped = optimizer if self.on_nonfinite == "skip" else None
        sinks = sink_specs(self.sinks) if state.is_world_process_zero else []
        self._latest, self._reported_step = _LatestRecord(), None
        log_every = self.log_every
        if log_every is None:
            by_steps = args.logging_strategy == "steps"
            log_every = max(int(state.logging_steps), 1) if by_steps else 1
        self.monitor = GradMonitor(model, sinks=sinks + [self._latest], log_every=log_every,
                                   optimizer=skipped, **self.options)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                              control: TrainerControl, **kwargs) -> None:
        if self.monitor is None:
            return
        # Number the monitor's step as the Trainer will: it counts this update once it is
        # done and logs it (loss, grad_norm) as global_step + 1. Records, warnings and
        # errors then carry that step.
        self.monitor.steps = state.global_step + 1
        self.monitor.step(self.max_norm)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict | None = None, **kwargs) -> None:
        if self.monitor is None or not self.report or logs is None:
            return
        # The Trainer synchronised already (loss.item()), so the records have landed.
        self.monitor.flush()
        record = self._latest.record
        if record is None or record.step != state.global_step:
            return  # no record of the step being logged
        if record.step == self._reported_step:
            return  # it went into an earlier log of this step (then the end-of-train summary)
        self._reported_step = record.step
        scalars = record.scalars()
        if not self.report_modules:
            scalars = {k: v for k, v in scalars.items() if "/module/" not in k}
        logs.update(scalars)
        # Trainer.log appended a copy of the logs to log_history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs) -> None:
        self._close()

    def _close(self) -> None:
        """Write the steps still in flight and close the sinks (idempotent)."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()


class _LatestRecord:
    """Keeps the last record written, for ``on_log``."""

    def __init__(self):
        self.record: StepRecord | None = None

    def write(self, record: StepRecord) -> None:
        self.record = record
