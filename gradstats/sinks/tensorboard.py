"""``"tensorboard:DIR"``: scalars and log2-magnitude histograms for TensorBoard.

Histograms go through ``add_histogram_raw`` with gradstats' own buckets, so only the
counts leave the GPU (``add_histogram`` would copy every gradient to the host, and fails
on NaN). They hold finite non-zero values only; NaN/Inf counts are logged beside them as
scalars.
"""
from __future__ import annotations

from ..record import module_tag
from . import Sink, require


class TensorBoardSink(Sink):
    """Writes, per logged step, the scalars of :meth:`StepRecord.scalars`
    (``grad_norm/total``, ``grad_norm/clip_coef``, ``grad_nonfinite/total``,
    ``grad_norm/module/<module>``, ``grad_nonfinite/module/<module>``, and
    ``grad_norm/param/<name>`` when ``parameters=True``; ``grad_norm/root`` for the model's own
    parameters), and on histogram steps ``grad_log2_abs/module/<module>``: the
    distribution of ``log2|g|`` over the module's finite non-zero gradient values, one
    bucket per power of two. The counts are exact; ``min``/``max`` are bucket edges and
    ``sum``/``sum_squares`` use bucket midpoints (TensorBoard only summarises them).

    Args:
        log_dir (str): the run folder, as for ``SummaryWriter``.
        writer (SummaryWriter, optional): an existing writer to use instead.
        parameters (bool): also write one norm scalar per parameter. Default: False
    """

    def __init__(self, log_dir: str | None = None, *, writer=None, parameters: bool = False):
        if writer is None:
            summary = require("torch.utils.tensorboard", "tensorboard", "tensorboard",
                              "tensorboard")
            writer = summary.SummaryWriter(log_dir=log_dir)
        self.writer = writer
        self.parameters = parameters

    def write(self, record) -> None:
        for tag, value in record.scalars(self.parameters).items():
            self.writer.add_scalar(tag, value, record.step)
        for module, counts in (record.module_hist or {}).items():
            self._add_log2_histogram(f"grad_log2_abs/{module_tag(module)}",
                                     *record.log2_buckets(counts),
                                     record.step)
        self.writer.flush()

    def _add_log2_histogram(self, tag: str, counts: list[int], edges: list[float],
                            step: int) -> None:
        filled = [k for k, count in enumerate(counts) if count]
        if not filled:
            return  # nothing finite and non-zero: no histogram to draw
        middles = [edge + 0.5 for edge in edges[:-1]]
        self.writer.add_histogram_raw(
            tag,
            min=edges[filled[0]],
            max=edges[filled[-1] + 1],
            num=sum(counts),
            sum=sum(c * m for c, m in zip(counts, middles)),
            sum_squares=sum(c * m * m for c, m in zip(counts, middles)),
            bucket_limits=edges[1:],  # TensorBoard takes each bucket's upper edge
            bucket_counts=counts,
            global_step=step,
        )

    def close(self) -> None:
        self.writer.close()
