"""``StepRecord``: one monitored step's statistics on the host, as the sinks receive them.

Built from host copies of a ``GradStats`` once they have landed (see ``monitor.py``), so
nothing here touches the GPU. Module-level figures are combined here, in float64, from the
per-parameter ones: a module's norm is the norm of its parameters' norms (exactly the
total-norm formula restricted to the module), its counts are sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
    """A record from a ``GradStats`` whose tensors are on the host (CPU)."""
    names, norm_type, hist = stats.names, stats.norm_type, stats.hist
    norm_values = stats.norms.double().tolist()
    counts = stats.nonfinite.tolist()
    modules = [module_of(name) for name in names]
    norms_by_module: dict[str, list[float]] = {}
    nonfinite_by_module: dict[str, int] = {}
    for module, norm, count in zip(modules, norm_values, counts):
        norms_by_module.setdefault(module, []).append(norm)
        nonfinite_by_module[module] = nonfinite_by_module.get(module, 0) + count
    record = StepRecord(
        step=step,
        total_norm=float(stats.total_norm),
        clip_coef=None if stats.clip_coef is None else float(stats.clip_coef),
        norm_type=norm_type,
        norms=dict(zip(names, norm_values)),
        nonfinite={name: c for name, c in zip(names, counts) if c},
        module_norms={m: combine_norms(v, norm_type) for m, v in norms_by_module.items()},
        module_nonfinite={m: c for m, c in nonfinite_by_module.items() if c},
    )
    if hist is not None:
        record.hist = dict(zip(names, hist.tolist()))
        module_ids = {m: i for i, m in enumerate(norms_by_module)}
        index = torch.tensor([module_ids[m] for m in modules], dtype=torch.int64)
        # Integer sums: exact and independent of order.
        summed = torch.zeros(len(module_ids), hist.shape[1], dtype=torch.int64)
        summed.index_add_(0, index, hist)
        record.module_hist = dict(zip(module_ids, summed.tolist()))
        exponents = range(stats.min_exp, stats.min_exp + hist.shape[1])
        record.bin_edges = [0.0] + [_power_of_two(e) for e in exponents]
        record.min_exp = stats.min_exp
    return record


def _power_of_two(exponent: int) -> float:
    try:
        return math.ldexp(1.0, exponent)
    except OverflowError:
        return math.inf
