"""benchmarks/host_overhead.py: the stubbed GPU path runs gradstats' Triton host path on
CPU tensors without launching anything, and puts everything back afterwards."""
import types

import pytest
import torch
from helpers import make_params

import gradstats
from gradstats import dispatch, native, worklist

host_overhead = pytest.importorskip("benchmarks.host_overhead")


def test_stubbed_gpu_path_takes_the_triton_route_and_restores_it(monkeypatch):
    monkeypatch.setenv("GRADSTATS_BACKEND", "auto")
    choose_backend = dispatch.choose_backend
    params = make_params([10, 300], torch.float32, torch.device("cpu"))
    paths = ("native", "python") if native.host_path_available() else ("python",)
    with host_overhead.stubbed_gpu_path():
        for case in host_overhead.cases(params).values():
            for median, best in host_overhead.host_us(case, calls=2, paths=paths).values():
                assert 0 < best <= median
        # One plan per host path (their keys differ): the Triton path, every call a hit.
        assert len(worklist._plans) == len(paths)
        assert worklist._plans[next(iter(worklist._plans))].groups[0].config.chunk == 16384
    assert dispatch.choose_backend is choose_backend and not worklist._plans
    grads = [p.grad.clone() for p in params]
    gradstats.fused_clip_grad_norm_(params, 1e-3)  # real launches again (reference path)
    assert all(not torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_two_trees_table_keeps_each_trees_best_round(tmp_path):
    trees = pytest.importorskip("benchmarks.host_overhead_trees")
    key = ("gpt2-small fp32 (148 tensors)", "grad_stats(histogram=False)")
    runs = {"this": [{key: 60.0}, {key: 50.0}], "other": [{key: 80.0}, {key: 100.0}]}
    args = types.SimpleNamespace(calls=5, rounds=2, at_once=False)
    trees.write_results(runs, tmp_path, tmp_path / "out", args)
    table = (tmp_path / "out" / "host-overhead-trees.md").read_text()
    # lowest medians 50 / 80; rounds' ratios 0.75 and 0.5, their median 0.625 too
    assert f"| {key[0]} | {key[1]} | 50.0 | 80.0 | 0.625 | 0.625 | 60, 50; 80, 100 |" in table
    assert "in turn" in table


def test_two_trees_at_once_pairs_each_round(tmp_path):
    trees = pytest.importorskip("benchmarks.host_overhead_trees")
    key = ("many-small fp32 (4,500 tensors)", "fused_clip_grad_norm_, clipping")
    runs = {"this": [{key: 90.0}, {key: 45.0}, {key: 40.0}],
            "other": [{key: 100.0}, {key: 50.0}, {key: 80.0}]}
    args = types.SimpleNamespace(calls=5, rounds=3, at_once=True)
    trees.write_results(runs, tmp_path, tmp_path / "out", args)
    table = (tmp_path / "out" / "host-overhead-trees.md").read_text()
    # rounds' ratios 0.9, 0.9, 0.5: their median 0.9; the lowest medians 40 / 50 = 0.8
    assert f"| {key[0]} | {key[1]} | 40.0 | 50.0 | 0.800 | 0.900 |" in table
    assert "at once" in table and "each on a core of its own" in table
