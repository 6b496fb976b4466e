"""``"wandb"``: ``wandb.log`` into the active Weights & Biases run."""
from __future__ import annotations

from ..record import module_tag
from . import Sink, require


class WandbSink(Sink):
    """Logs the scalars of :meth:`StepRecord.scalars` against the monitor's own step axis
    ``gradstats/step`` and, on
    histogram steps, ``grad_log2_abs/module/<module>`` as a ``wandb.Histogram`` over ``log2|g|``
    with one bin per power of two (finite non-zero values only: W&B would silently drop
    NaN/Inf, so their counts are logged beside as ``grad_nonfinite/...``).

    Args:
        run (wandb Run, optional): the run to log to. Default: ``wandb.run``, which must
            exist (call ``wandb.init()`` first).
        parameters (bool): also log one norm per parameter. Default: False
    """

    def __init__(self, run=None, *, parameters: bool = False):
        self._wandb = require("wandb", "wandb", "wandb", "wandb")
        self.run = run if run is not None else self._wandb.run
        if self.run is None:
            raise RuntimeError("the 'wandb' sink logs into the active run: call wandb.init() "
                               "before creating the monitor, or pass run=...")
        self.parameters = parameters
        # Records land a step or so late: logged with step=, W&B would drop every one that
        # is behind the run's own step. An own x-axis keeps them all.
        self.run.define_metric("gradstats/step")
        for prefix in ("grad_norm/*", "grad_nonfinite/*", "grad_log2_abs/*"):
            self.run.define_metric(prefix, step_metric="gradstats/step")

    def write(self, record) -> None:
        data = {"gradstats/step": record.step, **record.scalars(self.parameters)}
        for module, counts in (record.module_hist or {}).items():
            buckets, edges = record.log2_buckets(counts)
            if any(buckets):
                data[f"grad_log2_abs/{module_tag(module)}"] = self._wandb.Histogram(
                    np_histogram=(buckets, edges))
        self.run.log(data)
