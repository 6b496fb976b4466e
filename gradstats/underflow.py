"""What fp16/bf16 would make of a histogram's gradient values: the shares that would become 0,
turn subnormal, or overflow, with the bounds the histogram's layout allows.

The monitor's histograms (``GradStats.hist``) count ``floor(log2|x|)``: column 0 holds exact
zeros, column ``k >= 1`` holds ``floor(log2|x|) == min_exp + k - 1``, except that the first
(``k = 1``) also holds everything smaller and the last everything larger. A limit that falls
inside one of those clamped columns cannot be placed: only columns entirely on one side of it
are counted, which gives a lower and an upper bound instead of a figure.

The limits, with round-to-nearest-even:

- fp16 becomes 0 surely for ``|x| < 2^-25`` (``floor(log2|x|) <= -26``): half the smallest
  subnormal ``2^-24`` and below rounds to 0 (``2^-25`` itself ties to even, 0), while the
  binade ``[2^-25, 2^-24)`` rounds either way (``2^-24.5`` becomes ``2^-24``). Counted from
  ``2^-25``, so that binade is not called zero.
- fp16 is subnormal below ``2^-14`` (fewer mantissa bits) and overflows from ``2^16``
  (65504 is its largest finite value; ``[65520, 2^16)`` also rounds to Inf, not counted).
- bf16 has fp32's exponent range: subnormal below ``2^-126``, surely 0 below ``2^-134``
  (half its smallest subnormal ``2^-133``).
"""
from __future__ import annotations

from collections.abc import Sequence

from .record import StepRecord

__all__ = ["LIMITS", "underflow_bounds", "underflow_fractions"]

# The formats' facts, as powers of two.
FP16_SUBNORMAL_EXP = -24  # smallest fp16 subnormal
FP16_NORMAL_EXP = -14  # smallest fp16 normal
FP16_OVERFLOW_EXP = 16  # 2^16 = 65536 > 65504, fp16's largest finite value
BF16_SUBNORMAL_EXP = -133  # smallest bf16 subnormal
BF16_NORMAL_EXP = -126  # smallest bf16 normal (fp32's)
# Below half the smallest subnormal everything rounds to 0; the binade just above rounds
# either way (see the module docstring).
FP16_ZERO_EXP = FP16_SUBNORMAL_EXP - 1
BF16_ZERO_EXP = BF16_SUBNORMAL_EXP - 1

# name -> (exponent t, side): the share of non-zero finite values with |x| < 2^t ("below")
# or |x| >= 2^t ("above").
LIMITS = {
    "fp16_zero": (FP16_ZERO_EXP, "below"),
    "fp16_subnormal": (FP16_NORMAL_EXP, "below"),
    "bf16_zero": (BF16_ZERO_EXP, "below"),
    "bf16_subnormal": (BF16_NORMAL_EXP, "below"),
    "fp16_overflow": (FP16_OVERFLOW_EXP, "above"),
}


def underflow_bounds(record: StepRecord, names: Sequence[str] | None = None
                     ) -> dict[str, tuple[float, float]]:
    """Of the non-zero finite gradient values in ``record``'s histograms (all parameters,
    or ``names``), the shares past each of :data:`LIMITS`, as ``(low, high)`` bounds: equal
    when the histogram places the limit between two columns, apart when the limit falls
    inside a clamped first or last column."""
    if record.hist is None:
        raise ValueError("this record has no histograms (not a histogram step)")
    rows = [record.hist[n] for n in (names if names is not None else record.hist)]
    columns = [sum(column) for column in zip(*rows)] if rows else []
    return column_bounds(columns, record.min_exp)


def underflow_fractions(record: StepRecord, names: Sequence[str] | None = None
                        ) -> dict[str, float]:
    """:func:`underflow_bounds` as single figures: the share where the histogram tells it,
    NaN where the limit lies inside a clamped column (it cannot tell)."""
    return {name: low if low == high else float("nan")
            for name, (low, high) in underflow_bounds(record, names).items()}


def column_bounds(columns: list[int], min_exp: int) -> dict[str, tuple[float, float]]:
    """:func:`underflow_bounds` of one summed histogram row."""
    nonzero = sum(columns[1:])
    if not nonzero:
        return dict.fromkeys(LIMITS, (0.0, 0.0))
    last = len(columns) - 1
    # Column k covers exponents [low_k, high_k): -inf / +inf at the clamped ends.
    spans = [(-float("inf") if k == 1 else min_exp + k - 1,
              float("inf") if k == last else min_exp + k) for k in range(1, last + 1)]
    bounds = {}
    for name, (exponent, side) in LIMITS.items():
        below = sum(c for c, (_, high) in zip(columns[1:], spans) if high <= exponent)
        above = sum(c for c, (low, _) in zip(columns[1:], spans) if low >= exponent)
        if side == "below":
            bounds[name] = (below / nonzero, (nonzero - above) / nonzero)
        else:
            bounds[name] = (above / nonzero, (nonzero - below) / nonzero)
    return bounds
