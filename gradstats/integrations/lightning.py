"""``GradStatsCallback`` for Lightning: gradstats' fused pass at every optimizer step,
written to the Trainer's own loggers.

Works with ``lightning.pytorch`` and, where that is not installed, ``pytorch_lightning``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..checks import non_negative_float
from ..monitor import GradMonitor
from ..record import StepRecord
from ..sinks import sink_specs
from ._options import check_monitor_options

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

__all__ = ["GradStatsCallback"]


class GradStatsCallback(pl.Callback):
    r"""Per-step gradient statistics (norms, NaN/Inf counts, log2 histograms; per parameter
    and per module) from one fused pass, logged to ``trainer.loggers`` and to gradstats sinks;
    optionally the gradient clipping from the same pass.

    The pass runs in ``on_before_optimizer_step``. In Lightning 2.x
    (``plugins/precision/precision.py``) ``Precision.optimizer_step`` calls
    ``optimizer.step(closure=_wrap_closure)``, and ``_wrap_closure`` runs the closure
    (``training_step`` and ``backward``), then ``_after_closure``: the callbacks'
    ``on_before_optimizer_step``, the module's, then ``_clip_gradients``
    (``configure_gradient_clipping`` -> ``clip_gradients``). With ``precision="16-mixed"``
    (``plugins/precision/amp.py``) the closure runs first, then ``scaler.unscale_``, then
    ``_after_closure``, then ``scaler.step``. So the statistics describe the full,
    unscaled gradients of one optimizer step, before Lightning's own clipping: once per
    optimizer step under ``accumulate_grad_batches`` (``loops/optimization/automatic.py``
    only steps the optimizer on the last micro-batch), and for every ``opt.step()`` under
    manual optimization.

    Args:
        log_every (int, optional): log the optimizer steps whose ``global_step`` is a
            multiple of ``log_every``. Default: the Trainer's ``log_every_n_steps``
        hist_every (int, optional): add histograms (to gradstats sinks) every ``hist_every``
            steps. Default: None
        sinks: gradstats sinks (``"jsonl:PATH"``, ``"tensorboard:DIR"``, objects with
            ``write(record)``, ...) besides the Trainer's loggers. Default: none
        on_nonfinite (str or callable): as for :class:`gradstats.GradMonitor`. ``"raise"``
            raises ``RuntimeError`` from the training step before anything is clipped or
            updated; ``"skip"`` makes that optimizer step leave the weights unchanged (the
            Trainer still counts it). Warnings, errors and a callable name the Trainer's
            ``global_step``. Default: ``"warn"``
        norm_type (float): order of the norms. Default: 2.0
        max_norm (float, optional): clip the gradients to this total norm from the same
            pass, instead of Lightning's clipping: leave ``Trainer(gradient_clip_val=None)``
            (the default), or the gradients are clipped twice; setting both is an error.
        num_bins, min_exp (int): histogram layout, as for :func:`gradstats.grad_stats`.
        log_to_loggers (bool): write ``record.scalars()`` to ``trainer.loggers``.
            Default: True

    Scalars go to every logger with ``logger.log_metrics(record.scalars(), step=step)``,
    where ``step`` is ``trainer.global_step`` when the optimizer step ran (0 for the first
    update), the step Lightning logs that batch's ``self.log`` values at. Keys:
    ``grad_norm/total``, ``grad_nonfinite/total``, ``grad_norm/clip_coef`` (with
    ``max_norm``), ``grad_norm/module/<name>``, ``grad_nonfinite/module/<name>``.
    Only global rank zero writes (as Lightning's loggers do); every rank runs the pass,
    so clipping and ``"skip"`` act the same on all of them.

    Example::

        >>> from gradstats.integrations.lightning import GradStatsCallback
        >>> trainer = pl.Trainer(callbacks=[GradStatsCallback(max_norm=1.0, log_every=10)],
        ...                      logger=TensorBoardLogger("runs"))  # no gradient_clip_val
        >>> trainer.fit(model)
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
        log_to_loggers: bool = True,
    ):
        super().__init__()
        check_monitor_options(log_every=1 if log_every is None else log_every,
                              hist_every=hist_every, on_nonfinite=on_nonfinite,
                              norm_type=norm_type, num_bins=num_bins, min_exp=min_exp)
        self.max_norm = None if max_norm is None else non_negative_float("max_norm", max_norm)
        self.log_every, self.hist_every, self.sinks = log_every, hist_every, sinks
        self.on_nonfinite, self.norm_type = on_nonfinite, norm_type
        self.num_bins, self.min_exp = num_bins, min_exp
        self.log_to_loggers = log_to_loggers
        self.monitor: GradMonitor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # a monitor left by an earlier fit
        if self.max_norm is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"GradStatsCallback(max_norm={self.max_norm}) clips the gradients, and so does "
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}): they would be clipped "
                "twice. Leave gradient_clip_val unset (None) to clip in gradstats' pass, or "
                "drop max_norm to keep Lightning's clipping")
        optimizer = None
        if self.on_nonfinite == "skip":
            if len(trainer.optimizers) != 1:
                raise ValueError("GradStatsCallback(on_nonfinite='skip') needs exactly one "
                                 f"optimizer; this Trainer has {len(trainer.optimizers)}")
            # The torch optimizer itself (Lightning passes it, not its LightningOptimizer
            # wrapper, to on_before_optimizer_step): its step() runs the closure this
            # callback runs in, and that is the update to skip.
            optimizer = trainer.optimizers[0]
        sinks = []
        if trainer.is_global_zero:  # one writer per run, as Lightning's loggers
            sinks = sink_specs(self.sinks)
            if self.log_to_loggers and trainer.loggers:
                sinks.append(_LoggersSink(trainer.loggers))
        self.monitor = GradMonitor(
            pl_module, sinks=sinks, optimizer=optimizer,
            log_every=(self.log_every if self.log_every is not None
                       else max(trainer.log_every_n_steps, 1)),
            hist_every=self.hist_every, norm_type=self.norm_type,
            on_nonfinite=self.on_nonfinite, num_bins=self.num_bins, min_exp=self.min_exp)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.monitor is None:
            return  # not fitting (no on_fit_start)
        # Number the monitor's step as the Trainer's (it moves on only after the update), so
        # records (even those that land a step late), warnings and errors carry the step
        # Lightning logs this batch at.
        self.monitor.steps = trainer.global_step
        self.monitor.step(self.max_norm)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # before Lightning finalizes its loggers

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close()  # also writes the offending step of on_nonfinite="raise"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        """Write the steps still in flight and close the sinks (idempotent)."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()


class _LoggersSink:
    """Writes each record's scalars to Lightning loggers at the record's (trainer) step."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def write(self, record: StepRecord) -> None:
        scalars = record.scalars()
        for logger in self.loggers:
            logger.log_metrics(scalars, step=record.step)
