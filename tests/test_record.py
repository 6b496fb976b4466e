"""record.build_record: per-module figures from tensor sums over a cached module layout
equal ``combine_norms`` of each module's parameter norms, for every norm order."""
import math

import pytest
import torch

from gradstats.record import build_record, combine_norms, module_layout, module_of
from gradstats.stats import GradStats

NAMES = ["embed.weight", "h.0.attn.weight", "h.0.attn.bias", "h.1.mlp.weight", "scale",
         "h.0.attn.out", "h.1.mlp.bias"]


def host_stats(norms, nonfinite, p, hist=None):
    n = len(norms)
    return GradStats(
        norms=torch.tensor(norms, dtype=torch.float32), total_norm=torch.tensor(1.5),
        nonfinite=torch.tensor(nonfinite, dtype=torch.int64), hist=hist,
        numel=torch.ones(n, dtype=torch.int64), names=list(NAMES[:n]), clip_coef=None,
        norm_type=p, num_bins=4, min_exp=-3)


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 0.5, 0.0, -1.0])
@pytest.mark.parametrize("norms", [
    [3.0, 4.0, 0.5, 2.0, 7.0, 1.0, 0.25],
    [3.0, math.nan, 0.5, 2.0, 7.0, 1.0, 0.0],
    [1e30, 3e38, 1.0, 0.0, 1e-30, 2.0, 5.0],
])
def test_module_norms_equal_combine_norms_of_their_parameters(norms, p):
    record = build_record(3, host_stats(norms, [0] * len(norms), p))
    by_module = {}
    for name, norm in zip(NAMES, torch.tensor(norms, dtype=torch.float32).double().tolist()):
        by_module.setdefault(module_of(name), []).append(norm)
    assert list(record.module_norms) == list(by_module)  # first-seen order
    for module, values in by_module.items():
        expected = combine_norms(values, p)
        if math.isnan(expected):
            assert math.isnan(record.module_norms[module])
        else:
            assert record.module_norms[module] == pytest.approx(expected, rel=1e-12)


def test_counts_keep_only_the_non_zero_ones_per_parameter_and_module():
    hist = torch.arange(7 * 4, dtype=torch.int64).reshape(7, 4)
    record = build_record(0, host_stats([1.0] * 7, [0, 2, 0, 0, 5, 1, 0], 2.0, hist))
    assert record.nonfinite == {"h.0.attn.weight": 2, "scale": 5, "h.0.attn.out": 1}
    assert record.module_nonfinite == {"h.0.attn": 3, "": 5}
    assert record.hist["h.1.mlp.weight"] == [12, 13, 14, 15]
    assert record.module_hist["h.1.mlp"] == [12 + 24, 13 + 25, 14 + 26, 15 + 27]
    assert record.module_hist["h.0.attn"] == (hist[1] + hist[2] + hist[5]).tolist()


def test_module_layout_is_cached_per_list_of_names():
    assert module_layout(tuple(NAMES)) is module_layout(tuple(list(NAMES)))
    assert module_layout(tuple(NAMES)).modules == ["embed", "h.0.attn", "h.1.mlp", ""]
