"""Plain-PyTorch twins of every kernel: short enough to check by eye.

They are the fallback for tensors the kernels do not serve (CPU tensors in normal use,
sparse, complex or gapped-strided gradients) and the model the kernels are tested
against. They share the kernels' contracts (see ``gradstats/ops.py``) and numerics
(float32 accumulation, float64 for float64 input) but not their code.
"""
from __future__ import annotations

import math
import struct

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false

from . import launch_config as config  # chunk sizes: the reference sums per kernel chunk
from .norms import NormKind

EPS = 1e-6  # torch.nn.utils.clip_grads_with_norm_ adds the same to the total norm
# Chunks per slice in tensor_power: a 1M-element float32 buffer (4 MB) at the CPU chunk size.
SLICE_CHUNKS = 64


def _flat_values(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The stored values of ``tensor`` as one vector, and how many implicit zeros it has."""
    if tensor.is_sparse:
        values = tensor.coalesce().values().reshape(-1)
        return values, tensor.numel() - values.numel()
    if (tensor.layout is torch.strided and not tensor.is_contiguous()
            and is_non_overlapping_and_dense_or_false(tensor)):
        # A permuted-dense tensor (transposed, channels-last) in memory order, the flat
        # block the kernels read from its data_ptr: its chunks, hence its float32 sums, are
        # theirs. (Logical order would put other elements in each chunk.)
        return tensor.as_strided((tensor.numel(),), (1,)), 0
    return tensor.reshape(-1), 0


def tensor_power(values: torch.Tensor, p: float, kind: NormKind, chunk: int) -> torch.Tensor:
    """``sum |x|^p`` (``max |x|`` for the inf-norm) of 1-D ``values``, returned as float64;
    0 for no values.

    The kernels' structure: ``|x|^p`` summed in float32 (float64 for float64 input) per
    ``chunk`` elements, the chunk partials summed in float64. So the error is that of one
    chunk's float32 sum (torch's float32 ``vector_norm`` of millions of elements loses up
    to 1e-3), and a chunk whose sum overflows float32 is inf here as in the kernels (where
    torch returns a lone element's magnitude without squaring it)."""
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=values.device)
    real = values.abs() if values.is_complex() else values
    acc_dtype = torch.float64 if real.dtype == torch.float64 else torch.float32
    if kind == NormKind.INF:  # a maximum is exact in any order
        return torch.linalg.vector_norm(real, p, dtype=acc_dtype).to(torch.float64)
    if real.numel() <= chunk:  # the common small tensor: one chunk, fewest ops
        return _one_chunk_power(real, p, kind, acc_dtype)
    if kind == NormKind.L2:
        return _sum_of_squares(real, acc_dtype, chunk)
    # A slice of whole chunks at a time, so the |x|^p buffer stays small (in cache); sum()
    # reduces each chunk pairwise in acc_dtype: as accurate as the kernels, and on the CPU
    # faster than vector_norm's 1- and p-norms.
    step = chunk * SLICE_CHUNKS
    buffer = torch.empty(min(step, real.numel()), dtype=acc_dtype, device=real.device)
    partials = []
    for start in range(0, real.numel(), step):
        powers = _powers(real[start:start + step], p, kind, buffer)
        full = powers.numel() // chunk * chunk
        partials.append(powers[:full].view(-1, chunk).sum(1))
        if full < powers.numel():
            partials.append(powers[full:].sum().reshape(1))
    return torch.cat(partials).sum(dtype=torch.float64)


def _sum_of_squares(flat: torch.Tensor, acc_dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """Per chunk, torch's 2-norm in ``acc_dtype`` (one fused pass, no buffer: the 2-norm
    is torch's fastest CPU reduction), squared in ``acc_dtype`` so it overflows where the
    kernels' float32 sum does; the squares summed in float64. Within ~1e-6 of float64,
    where one 2-norm over 8M elements loses 3e-4."""
    full = flat.numel() // chunk * chunk
    norms = torch.linalg.vector_norm(flat[:full].view(-1, chunk), dim=1, dtype=acc_dtype)
    power = norms.square().sum(dtype=torch.float64)
    if full < flat.numel():
        power += _one_chunk_power(flat[full:], 2.0, NormKind.L2, acc_dtype)
    return power


def _kernel_chunk(dtype: torch.dtype, device: torch.device) -> int:
    """The chunk the kernels use for ``dtype`` on ``device`` (float32's for dtypes no
    kernel reads), read on every call so tests can shrink it."""
    kernel_dtype = dtype if dtype in config.GPU_CONFIGS else torch.float32
    return config.launch_config(kernel_dtype, device).chunk


def _one_chunk_power(values: torch.Tensor, p: float, kind: NormKind, acc_dtype) -> torch.Tensor:
    """``sum |x|^p`` of at most one chunk, in ``acc_dtype`` (so it overflows where the
    kernels' chunk sum does), as float64."""
    if kind == NormKind.L1:
        return values.abs().sum(dtype=acc_dtype).to(torch.float64)
    norm = torch.linalg.vector_norm(values, p, dtype=acc_dtype)
    power = norm.square() if kind == NormKind.L2 else norm.pow(p)
    return power.to(torch.float64)


def _powers(values: torch.Tensor, p: float, kind: NormKind, buffer: torch.Tensor) -> torch.Tensor:
    """``|x|^p`` in ``buffer``'s dtype, written into its start (one buffer reused for every
    slice: no fresh pages to fault in each time)."""
    out = buffer[:values.numel()]
    # 16-bit values are widened (exactly) into the buffer first, then updated in place.
    source = values if values.dtype == out.dtype else out.copy_(values)
    if kind == NormKind.L2:
        return torch.square(source, out=out)
    torch.abs(source, out=out)
    return out if kind == NormKind.L1 else out.pow_(p)


def log2_histogram(
    values: torch.Tensor, num_bins: int, min_exp: int, has_nonfinite: bool = True
) -> torch.Tensor:
    """Column 0: exact zeros; column k >= 1: finite x with floor(log2|x|) == min_exp + k - 1,
    out-of-range values clamped into columns 1 and num_bins - 1; non-finite values dropped
    (``has_nonfinite=False`` promises there are none and skips looking)."""
    magnitude = values.abs()
    if magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()  # exact; frexp wants float32 or float64
    _, exponent = torch.frexp(magnitude)  # |x| = m * 2^e, m in [0.5, 1): floor(log2|x|) = e - 1
    column = (exponent - min_exp).clamp_(1, num_bins - 1)  # int32: min_exp is within +-1100
    column.masked_fill_(magnitude == 0, 0)
    if has_nonfinite:
        column.masked_fill_(~torch.isfinite(magnitude), num_bins)  # an extra column, dropped
    if values.device.type == "cpu":
        return torch.bincount(column, minlength=num_bins + 1)[:num_bins]
    # bincount would read its size back from the GPU; index_add_ does not.
    counts = torch.zeros(num_bins + 1, dtype=torch.int64, device=values.device)
    counts.index_add_(0, column, torch.ones_like(column, dtype=torch.int64))
    return counts[:num_bins]


def _power_shows_nonfinite(p: float, kind: NormKind, dtype: torch.dtype) -> bool:
    """Whether any NaN or Inf element makes the power NaN or Inf: every term is >= 0 and a
    NaN or Inf term stays one, except for a general p that rounds to 0 in float32 (the
    accumulation dtype below float64), where NaN^0 = Inf^0 = 1."""
    if kind != NormKind.LP or dtype in (torch.float64, torch.complex128):
        return True
    try:
        return struct.unpack("f", struct.pack("f", p))[0] > 0.0
    except OverflowError:  # beyond float32's range: far from 0
        return True


def accumulate_stats(
    tensors: list[torch.Tensor], p: float, kind: NormKind, num_bins: int, min_exp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tensor: power (float64), non-finite count (int64) and histogram ([n, num_bins])."""
    device = tensors[0].device
    power = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    nonfinite = torch.zeros(len(tensors), dtype=torch.int64, device=device)
    hist = torch.zeros(len(tensors), num_bins, dtype=torch.int64, device=device)
    for row, tensor in enumerate(tensors):
        values, implicit_zeros = _flat_values(tensor.detach())
        tensor_pow = tensor_power(values, p, kind, _kernel_chunk(tensor.dtype, device))
        power[row] = tensor_pow
        # A NaN or Inf element makes the power non-finite (p > 0), so a finite power proves
        # there is none and saves a full pass. Reading the value is free on the CPU only.
        if (device.type == "cpu" and math.isfinite(tensor_pow)
                and _power_shows_nonfinite(p, kind, tensor.dtype)):
            has_nonfinite = False
        else:
            nonfinite[row] = values.numel() - torch.isfinite(values).sum()
            has_nonfinite = True
        if num_bins:
            hist[row] = log2_histogram(values, num_bins, min_exp, has_nonfinite)
            hist[row, 0] += implicit_zeros
    return power, nonfinite, hist


def finalize(
    power: torch.Tensor, p: float, kind: NormKind, max_norm: float, norms_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor norms, the total norm and ``min(max_norm / (total + 1e-6), 1)``."""
    if kind == NormKind.INF:
        norms = power
        total = power.max() if power.numel() else power.new_zeros(())
    else:
        root = 1.0 / p
        norms = power.pow(root)
        total = power.sum().pow(root)
    clip_coef = torch.clamp(max_norm / (total + EPS), max=1.0)
    # copy=True: an op's outputs must never alias its input.
    return (norms.to(norms_dtype, copy=True), total.to(norms_dtype, copy=True),
            clip_coef.to(norms_dtype))


# The dtype of |x| for complex x: torch's norms of complex tensors are real.
_REAL_DTYPES = {torch.complex32: torch.float16, torch.complex64: torch.float32,
                torch.complex128: torch.float64}


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return _REAL_DTYPES.get(dtype, dtype)


def composed_norm(tensor: torch.Tensor, p: float) -> torch.Tensor:
    """``vector_norm`` in the tensor's dtype, as torch computes it, for the norm types
    without a fused form (0, p < 0, -inf). An empty tensor has no such norm for p < 0 or
    -inf (torch raises); it gets +inf, which contributes nothing to the total: inf^p = 0
    for p < 0, and +inf never wins a minimum."""
    if tensor.numel() == 0 and p < 0:
        return torch.full((), math.inf, dtype=_real_dtype(tensor.dtype), device=tensor.device)
    return torch.linalg.vector_norm(tensor, p)


def composed_partials(tensors: list[torch.Tensor], p: float,
                      device: torch.device) -> torch.Tensor:
    """Per tensor (a shard of a larger one), what it adds to the whole tensor's composed
    norm, as float64 on ``device``: the count of non-zeros (``p = 0``) or ``sum |x|^p``
    (``p < 0``), both added across shards, or ``min |x|`` (``p = -inf``), the minimum
    across shards. An empty shard gives the identity: 0, or +inf for the minimum (torch
    raises on it). A zero makes ``|0|^p`` inf for ``p < 0``, so the norm is 0, as torch's.

    The shard's norm is torch's ``vector_norm`` (in float32 for 16-bit shards, so the
    root is not rounded to 16 bits before the power undoes it), raised to ``p``."""
    # An empty shard's norm: +inf for p < 0 (inf^p = 0, the sum's identity; and the
    # minimum's), 0 for p = 0.
    identity = math.inf if p < 0 else 0.0
    partials = torch.full((len(tensors),), identity, dtype=torch.float64, device=device)
    for row, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            continue
        widen = tensor.dtype in (torch.float16, torch.bfloat16)
        norm = torch.linalg.vector_norm(tensor, p, dtype=torch.float32 if widen else None)
        partials[row] = norm.to(device, torch.float64)
    if p < 0 and p != -math.inf:
        partials.pow_(p)  # 0 (a zero in the shard) -> inf, inf -> 0: as |x|^p would
    return partials


def composed_norms_from_partials(partials: torch.Tensor, p: float,
                                 tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's composed norm from its partials combined across shards (see
    :func:`composed_partials`), rounded to the tensor's (real) dtype as torch's per-tensor
    norms are. A tensor empty on every shard gets +inf for p < 0 and -inf, as in
    :func:`composed_norm`."""
    norms = partials if p in (0.0, -math.inf) else partials.pow(1.0 / p)
    return [norm.to(_real_dtype(tensor.dtype)) for norm, tensor in zip(norms.unbind(), tensors)]


def composed_total(norms: list[torch.Tensor], p: float, device: torch.device) -> torch.Tensor:
    """torch's total: the ``p``-norm of the stacked per-tensor norms."""
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), p)


def scale_(tensors: list[torch.Tensor], clip_coef: torch.Tensor) -> None:
    # No clipping needed: leave the tensors alone, as the kernel does. Reading the value is
    # free on the CPU only; elsewhere the multiply by exactly 1.0 keeps every bit anyway.
    if clip_coef.device.type == "cpu" and bool(clip_coef >= 1):
        return
    for tensor in tensors:
        tensor.mul_(clip_coef.to(tensor.device))


def clamp_(tensors: list[torch.Tensor], lo: float, hi: float) -> None:
    for tensor in tensors:
        tensor.clamp_(min=lo, max=hi)
