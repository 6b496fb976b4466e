"""``StepRecord``: one monitored step's statistics on the host, as the sinks receive them.

Built from host copies of a ``GradStats`` once they have landed (see ``monitor.py``), so
nothing here touches the GPU. Module-level figures are combined here, in float64, from the
per-parameter ones: a module's norm is the norm of its parameters' norms (exactly the
total-norm formula restricted to the module), its counts are sums.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .activations import ActivationRecord

# The module name of parameters registered on the model itself. torch refuses "" as a
# submodule name, so no real module can share it (a child may be called "<root>").
ROOT_MODULE = ""
ROOT_LABEL = "<root>"  # how the logging sink shows ROOT_MODULE
ROOT_TAG = "root"  # its dashboard tags: grad_norm/root, outside the grad_norm/module/ space


def module_of(parameter_name: str) -> str:
    """``'layers.3.mlp.fc.weight'`` -> ``'layers.3.mlp.fc'``: the module that owns it
    (``ROOT_MODULE``, the empty string, for a parameter of the model itself)."""
    module, _, _ = parameter_name.rpartition(".")
    return module


def combine_norms(norms: list[float], p: float) -> float:
    """The ``p``-norm of a vector of norms: how norms of parts make the norm of the whole
    (the same formula torch's ``get_total_norm`` applies to per-tensor norms)."""
    if not norms:
        return 0.0
    if any(math.isnan(n) for n in norms):
        return math.nan
    if p == math.inf:
        return max(norms)
    if p == -math.inf:
        return min(norms)
    if p == 0:
        return float(sum(n != 0 for n in norms))
    if p < 0 and any(n == 0 for n in norms):
        return 0.0  # 0^p = inf dominates the sum, and inf^(1/p) = 0
    try:
        return math.fsum(n ** p for n in norms) ** (1.0 / p)
    except OverflowError:
        return math.inf


@dataclass
class StepRecord:
    """The statistics of one monitored step, as plain Python values.

    Attributes:
        step: the monitor's step (0-based count of ``GradMonitor.step`` calls).
        total_norm: norm of all gradients together.
        clip_coef: the factor the gradients were scaled by (1.0 when no clipping was
            needed), or ``None`` when the step did not clip.
        norm_type: the order of the norms.
        norms: parameter name -> gradient norm (parameters with a gradient).
        nonfinite: parameter name -> count of NaN/Inf elements, non-zero counts only.
        module_norms, module_nonfinite: the same per owning module (``'layers.3.mlp'``;
            ``''`` for the parameters registered on the model itself).
        hist, module_hist: name -> log2-magnitude counts of the finite values (see
            ``GradStats.hist``), on histogram steps only (else ``None``).
        bin_edges: the ``len(counts) + 1`` edges of those counts: ``[0, 2^min_exp, ...]``.
        min_exp: the histogram's ``min_exp`` (on histogram steps).
        activations: per-module forward-output and ``dL/dh`` figures and where a NaN/Inf
            was born, when the monitor tracks activations (see :mod:`gradstats.activations`).
    """

    step: int
    total_norm: float
    clip_coef: float | None
    norm_type: float
    norms: dict[str, float]
    nonfinite: dict[str, int]
    module_norms: dict[str, float]
    module_nonfinite: dict[str, int]
    hist: dict[str, list[int]] | None = None
    module_hist: dict[str, list[int]] | None = None
    bin_edges: list[float] | None = None
    min_exp: int | None = None
    activations: ActivationRecord | None = None

    def log2_buckets(self, counts: list[int]) -> tuple[list[int], list[float]]:
        """A histogram row over ``log2|g|``: the counts of columns ``1..`` and their
        ``len + 1`` edges ``min_exp, min_exp + 1, ...``. Column 0 (exact zeros) has no
        place on a log axis and is left out."""
        buckets = counts[1:]
        return buckets, [float(self.min_exp + k) for k in range(len(buckets) + 1)]

    def scalars(self, parameters: bool = False) -> dict[str, float]:
        """Flat ``tag -> value`` scalars, as the dashboard sinks log them."""
        data = {"grad_norm/total": self.total_norm,
                "grad_nonfinite/total": sum(self.nonfinite.values())}
        if self.clip_coef is not None:
            data["grad_norm/clip_coef"] = self.clip_coef
        # Modules under their own prefix: a module named "total" must not shadow the total.
        for module, norm in self.module_norms.items():
            tag = module_tag(module)
            data[f"grad_norm/{tag}"] = norm
            data[f"grad_nonfinite/{tag}"] = self.module_nonfinite.get(module, 0)
        if self.activations is not None:
            for module, figures in self.activations.modules.items():
                tag = module_tag(module)
                data[f"act_norm/{tag}"] = figures.output_norm
                if figures.grad_norm is not None:
                    data[f"act_grad_norm/{tag}"] = figures.grad_norm
        if parameters:
            data.update({f"grad_norm/param/{name}": n for name, n in self.norms.items()})
        return data

    def to_json(self) -> dict:
        """A JSON-safe dict: non-finite floats become the strings ``"nan"``, ``"inf"``,
        ``"-inf"`` (strict JSON has no NaN; ``float()`` reads them back)."""
        return {
            "step": self.step,
            "total_norm": _json_float(self.total_norm),
            "clip_coef": _json_float(self.clip_coef),
            "norm_type": _json_float(self.norm_type),
            "norms": {k: _json_float(v) for k, v in self.norms.items()},
            "nonfinite": self.nonfinite,
            "module_norms": {k: _json_float(v) for k, v in self.module_norms.items()},
            "module_nonfinite": self.module_nonfinite,
            **({"hist": self.hist, "module_hist": self.module_hist,
                "bin_edges": [_json_float(edge) for edge in self.bin_edges],
                "min_exp": self.min_exp}
               if self.hist is not None else {}),
            **({"activations": self.activations.to_json()}
               if self.activations is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> StepRecord:
        """The record :meth:`to_json` wrote (``"nan"``/``"inf"`` strings back to floats).

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a dict.
        """
        edges = data.get("bin_edges")
        min_exp = data.get("min_exp")
        if edges is not None and min_exp is None and len(edges) > 1 and 0 < edges[1] < math.inf:
            min_exp = math.frexp(float(edges[1]))[1] - 1  # files written before min_exp was
        return cls(
            step=int(data["step"]),
            total_norm=float(data["total_norm"]),
            clip_coef=None if data["clip_coef"] is None else float(data["clip_coef"]),
            norm_type=float(data["norm_type"]),
            norms={k: float(v) for k, v in data["norms"].items()},
            nonfinite={k: int(v) for k, v in data["nonfinite"].items()},
            module_norms={k: float(v) for k, v in data["module_norms"].items()},
            module_nonfinite={k: int(v) for k, v in data["module_nonfinite"].items()},
            hist=data.get("hist"),
            module_hist=data.get("module_hist"),
            bin_edges=None if edges is None else [float(edge) for edge in edges],
            min_exp=min_exp,
            activations=(ActivationRecord.from_json(data["activations"])
                         if data.get("activations") is not None else None),
        )


def module_tag(module: str) -> str:
    """The dashboard tag of a module's figures: ``module/<name>``, and ``root`` for the
    model's own parameters (readable, and no real module can take it)."""
    return ROOT_TAG if module == ROOT_MODULE else f"module/{module}"


def _json_float(value: float | None):
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def build_record(step: int, stats) -> StepRecord:
    """A record from a ``GradStats`` whose tensors are on the host (CPU).

    Per-parameter values become dicts in C-speed passes; per-module figures are summed
    by tensor ops over a module layout cached per list of names (it changes only when
    the model does), so the Python work per parameter is a ``zip`` or two."""
    names, norm_type, hist = stats.names, stats.norm_type, stats.hist
    layout = module_layout(tuple(names))
    norm_values = stats.norms.double().tolist()
    nonfinite_by_module = torch.zeros(len(layout.modules), dtype=torch.int64).index_add_(
        0, layout.index, stats.nonfinite)
    record = StepRecord(
        step=step,
        total_norm=float(stats.total_norm),
        clip_coef=None if stats.clip_coef is None else float(stats.clip_coef),
        norm_type=norm_type,
        norms=dict(zip(names, norm_values)),
        nonfinite=nonzero_named(names, stats.nonfinite),
        module_norms=dict(zip(layout.modules, _module_norms(stats.norms, layout, norm_type))),
        module_nonfinite=nonzero_named(layout.modules, nonfinite_by_module),
    )
    if hist is not None:
        record.hist = dict(zip(names, hist.tolist()))
        # Integer sums: exact and independent of order.
        summed = torch.zeros(len(layout.modules), hist.shape[1], dtype=torch.int64)
        summed.index_add_(0, layout.index, hist)
        record.module_hist = dict(zip(layout.modules, summed.tolist()))
        exponents = range(stats.min_exp, stats.min_exp + hist.shape[1])
        record.bin_edges = [0.0] + [_power_of_two(e) for e in exponents]
        record.min_exp = stats.min_exp
    return record


def nonzero_named(names: Sequence[str], counts: torch.Tensor) -> dict[str, int]:
    """``{name: count}`` for the non-zero entries of the host tensor ``counts``: only
    those are read one by one (usually none)."""
    positions = torch.nonzero(counts).flatten().tolist()
    if not positions:
        return {}
    values = counts.tolist()
    return {names[i]: values[i] for i in positions}


@dataclass(frozen=True)
class ModuleLayout:
    """Which module owns each parameter: ``modules`` in first-seen order, and
    ``index[i]``, parameter ``i``'s module's position in it."""

    modules: list[str]
    index: torch.Tensor  # int64, one entry per parameter


# Keyed by the names themselves: a monitor's names change only with its model, so the
# few layouts in use (one per monitored model) stay cached.
@functools.lru_cache(maxsize=8)
def module_layout(names: tuple[str, ...]) -> ModuleLayout:
    positions: dict[str, int] = {}
    index = [positions.setdefault(module_of(name), len(positions)) for name in names]
    return ModuleLayout(list(positions), torch.tensor(index, dtype=torch.int64))


def _module_norms(norms: torch.Tensor, layout: ModuleLayout, p: float) -> list[float]:
    """Each module's ``combine_norms`` of its parameters' norms. The 1-, 2- and inf-norms
    as float64 tensor sums (NaN propagates, overflow gives inf, as there); other orders
    through ``combine_norms`` itself."""
    norms = norms.double()
    count = len(layout.modules)
    if p == math.inf:
        # A module's maximum (NaN propagates); include_self=False keeps the zeros it
        # starts from out of it.
        return torch.zeros(count, dtype=torch.float64).scatter_reduce_(
            0, layout.index, norms, "amax", include_self=False).tolist()
    if p in (1.0, 2.0):
        summed = torch.zeros(count, dtype=torch.float64).index_add_(0, layout.index, norms ** p)
        return (summed if p == 1.0 else summed.sqrt_()).tolist()
    by_module: list[list[float]] = [[] for _ in range(count)]
    for position, norm in zip(layout.index.tolist(), norms.tolist()):
        by_module[position].append(norm)
    return [combine_norms(values, p) for values in by_module]


def _power_of_two(exponent: int) -> float:
    try:
        return math.ldexp(1.0, exponent)
    except OverflowError:
        return math.inf
