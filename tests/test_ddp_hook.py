"""``DDPStatsHook`` on 2 gloo ranks: statistics taken per bucket during backward against
torch's clipping on an identical DDP model without the hook, float64 norms and
``gradstats.grad_stats`` on ``p.grad``.

One group of processes, spawned here, runs every check in order and writes each one's
outcome to a file per rank; the tests read them. A group that does not finish in time is
killed and its unfinished checks fail: a hang never blocks the run.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
from spawned_ranks import free_port, run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
SUITE_TIMEOUT_S = 90  # spawn included; a collective times out after 30 s
BINS, MIN_EXP = 16, -12
NORM_TYPES = (2.0, 1.0, math.inf, 3.0)
TINY_BUCKETS_MB = 0.0002  # ~200 bytes: the model below spreads over 4 buckets


# -- spawning ---------------------------------------------------------------------------
def _rank_main(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    outcomes = {}
    try:
        for check in CHECKS:
            try:
                check(rank)
                outcomes[check.__name__] = "ok"
            except Exception:  # reported to the parent, which fails the test
                outcomes[check.__name__] = traceback.format_exc()
            with open(os.path.join(outdir, f"{rank}.json"), "w") as file:
                json.dump(outcomes, file)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_suite() -> dict[str, list[str]]:
    """Each check's outcome on every rank ("ok", a traceback, or "unfinished")."""
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        run_ranks(_rank_main, [(rank, port, outdir) for rank in range(WORLD)], SUITE_TIMEOUT_S)
        outcomes = {check.__name__: [] for check in CHECKS}
        for rank in range(WORLD):
            path = os.path.join(outdir, f"{rank}.json")
            done = json.load(open(path)) if os.path.exists(path) else {}
            for name in outcomes:
                outcomes[name].append(done.get(name, f"unfinished on rank {rank} (timeout "
                                                      "or crash)"))
    return outcomes


_outcomes: dict[str, list[str]] = {}


def _assert_ok(check) -> None:
    if not _outcomes:
        _outcomes.update(_run_suite())
    failures = [outcome for outcome in _outcomes[check.__name__] if outcome != "ok"]
    assert not failures, failures[0]


# -- helpers run on each rank -------------------------------------------------------------
class _Net(torch.nn.Module):
    """A few layers of uneven sizes; ``spare`` is used only when asked (unused parameters)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 24)
        self.hidden = torch.nn.Linear(24, 24)
        self.norm = torch.nn.LayerNorm(24)
        self.head = torch.nn.Linear(24, 3)
        self.spare = torch.nn.Linear(24, 5)

    def forward(self, x, use_spare=False):
        h = self.norm(torch.tanh(self.hidden(torch.relu(self.embed(x)))))
        out = self.head(h).sum()
        if use_spare:
            out = out + self.spare(h).sum()
        return out


def _pair(view: bool, find_unused: bool = False, user_hook=None, **ddp_options):
    """Two DDP models from the same weights: ``(with_hook_model, reference_model)``; the
    reference has torch's default averaging (or ``user_hook`` registered itself)."""
    torch.manual_seed(0)
    net = _Net()
    net.spare.requires_grad_(find_unused)  # otherwise DDP waits for its gradient forever
    options = dict(bucket_cap_mb=TINY_BUCKETS_MB, gradient_as_bucket_view=view,
                   find_unused_parameters=find_unused, **ddp_options)
    DDP = torch.nn.parallel.DistributedDataParallel
    ours, reference = DDP(copy.deepcopy(net), **options), DDP(copy.deepcopy(net), **options)
    if user_hook is not None:
        reference.register_comm_hook(None, user_hook)
    return ours, reference


def _batch(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(7, 6, generator=generator) * (step + 1)


def _backward(model, rank, step, **kwargs) -> None:
    model.zero_grad(set_to_none=True)
    model(_batch(rank, step), **kwargs).backward()


def _grads(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _float64_total(grads, p) -> torch.Tensor:
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.double(), p) for g in grads]), p)


def _close(actual, expected, rtol=1e-5, atol=1e-7) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               equal_nan=True)


def _assert_grads_close(ours, reference) -> None:
    for mine, theirs in zip(_grads(ours), _grads(reference), strict=True):
        _close(mine, theirs)


def _hook(model, p=2.0, **kwargs):
    import gradstats
    return gradstats.DDPStatsHook(model, p, num_bins=BINS, min_exp=MIN_EXP, **kwargs)


def _assert_clips_like_torch(hook, ours, reference, torch_norm_type=2.0) -> None:
    """hook.clip_grad_norm_(0.5) on ``ours`` gives torch's total and gradients on the
    reference model."""
    total = hook.clip_grad_norm_(0.5)
    _close(total, torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5, torch_norm_type))
    _assert_grads_close(ours, reference)


def _assert_stats_equal_post_backward(stats, model, p) -> None:
    """A GradStats equals gradstats.grad_stats on p.grad (counts exactly) and float64."""
    import gradstats
    expected = gradstats.grad_stats(model, p, num_bins=BINS, min_exp=MIN_EXP)
    assert stats.names == expected.names, (stats.names, expected.names)
    torch.testing.assert_close(stats.hist, expected.hist, rtol=0, atol=0)
    torch.testing.assert_close(stats.nonfinite, expected.nonfinite, rtol=0, atol=0)
    torch.testing.assert_close(stats.numel, expected.numel, rtol=0, atol=0)
    grads = _grads(model)
    _close(stats.norms, torch.stack([torch.linalg.vector_norm(g.double(), p) for g in grads]))
    _close(stats.total_norm, _float64_total(grads, p))


# -- checks ---------------------------------------------------------------------------------
def check_clip_matches_torch_over_norm_types_and_bucket_view(rank):
    for view in (False, True):
        for p in NORM_TYPES:
            ours, reference = _pair(view)
            hook = _hook(ours, p, histogram=False)
            for step in range(3):  # the first iteration's buckets, then the rebuilt ones
                _backward(ours, rank, step)
                _backward(reference, rank, step)
                assert hook.ready, (view, p, step)
                _close(hook.get_total_norm(), _float64_total(_grads(reference), p))
                assert hook.ready  # reading the norm changes nothing
                max_norm = 0.5 if step != 1 else 1e6  # step 1: no clipping needed
                total = hook.clip_grad_norm_(max_norm)
                expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, p)
                _close(total, expected)
                assert total.dtype == expected.dtype
                _assert_grads_close(ours, reference)
                assert hook.ready == (step == 1)  # clipped gradients are not the ones seen


def check_several_buckets_are_used(rank):
    ours, _ = _pair(view=False)
    hook = _hook(ours)
    counts = []
    for step in range(2):
        _backward(ours, rank, step)
        counts.append(len(hook._partials))
    # DDP's first iteration puts every parameter in one bucket (without
    # find_unused_parameters); from the second on, the buckets are rebuilt to the cap.
    assert counts[1] >= 3, counts


def check_grad_stats_match_post_backward_pass(rank):
    for view in (False, True):
        for p in (2.0, math.inf):
            ours, _ = _pair(view)
            hook = _hook(ours, p)
            for step in range(2):
                _backward(ours, rank, step)
                assert hook.ready
                _assert_stats_equal_post_backward(hook.grad_stats(), ours, p)
                assert hook.grad_stats().clip_coef is None


def check_grad_stats_with_max_norm_clips_like_torch(rank):
    ours, reference = _pair(view=True)
    hook = _hook(ours)
    _backward(ours, rank, 0)
    _backward(reference, rank, 0)
    stats = hook.grad_stats(max_norm=0.25)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.25)
    _close(stats.total_norm, expected)
    _close(stats.clip_coef, 0.25 / (expected + 1e-6))
    _assert_grads_close(ours, reference)


def check_histogram_off_gives_no_histogram(rank):
    ours, _ = _pair(view=False)
    hook = _hook(ours, histogram=False)
    _backward(ours, rank, 0)
    stats = hook.grad_stats()
    assert stats.hist is None
    _close(stats.total_norm, _float64_total(_grads(ours), 2.0))


def check_no_sync_step_falls_back_then_sync_step_uses_partials(rank):
    for view in (False, True):
        ours, reference = _pair(view)
        hook = _hook(ours, 2.0)
        for model in (ours, reference):
            model.zero_grad(set_to_none=True)
            with model.no_sync():  # local accumulation: no hook runs
                model(_batch(rank, 0)).backward()
        assert not hook.ready
        # The local (not averaged) gradients, read after backward: torch's figure.
        _close(hook.get_total_norm(), _float64_total(_grads(reference), 2.0))
        for model in (ours, reference):
            model(_batch(rank, 1)).backward()  # the sync step averages the accumulated sum
        assert hook.ready
        _assert_stats_equal_post_backward(hook.grad_stats(), ours, 2.0)
        _assert_clips_like_torch(hook, ours, reference)


def check_forward_after_backward_invalidates_partials(rank):
    ours, _ = _pair(view=False)
    hook = _hook(ours)
    _backward(ours, rank, 0)
    assert hook.ready
    with torch.no_grad():
        ours(_batch(rank, 5))
    assert not hook.ready


def check_gradient_edit_after_backward_falls_back(rank):
    for view in (False, True):
        ours, reference = _pair(view)
        hook = _hook(ours, 1.0)
        _backward(ours, rank, 0)
        _backward(reference, rank, 0)
        for model in (ours, reference):  # an in-place torch op
            for grad in _grads(model):
                grad.mul_(0.125)
        assert not hook.ready
        _assert_clips_like_torch(hook, ours, reference, torch_norm_type=1.0)


def check_grad_scaler_unscale_falls_back(rank):
    """GradScaler.unscale_ changes the gradients without bumping a version counter: the
    hook counts the call and reads p.grad, instead of clipping by the scaled norm."""
    for view in (False, True):
        ours, reference = _pair(view)
        hook = _hook(ours)
        totals = []
        for model in (ours, reference):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            model.zero_grad(set_to_none=True)
            scaler.scale(model(_batch(rank, 0))).backward()
            assert model is reference or hook.ready  # nothing has touched them yet
            scaler.unscale_(optimizer)
            if model is ours:
                assert not hook.ready
                totals.append(hook.clip_grad_norm_(0.5))
            else:
                totals.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        _close(totals[0], totals[1])
        _assert_grads_close(ours, reference)


def check_wrapped_user_hook(rank):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    calls = []

    def counting_fp16_hook(state, bucket):
        calls.append(bucket.index())
        return default_hooks.fp16_compress_hook(state, bucket)

    for view in (False, True):
        ours, reference = _pair(view, user_hook=default_hooks.fp16_compress_hook)
        hook = _hook(ours, 2.0, wrapped_hook=counting_fp16_hook)
        for step in range(2):
            calls.clear()
            _backward(ours, rank, step)
            _backward(reference, rank, step)
            assert calls and calls == sorted(calls), calls
            assert hook.ready
            _assert_grads_close(ours, reference)  # fp16 rounding: the same in both
            _assert_stats_equal_post_backward(hook.grad_stats(), ours, 2.0)
            _assert_clips_like_torch(hook, ours, reference)


def check_nan_on_one_rank_raises_on_every_rank(rank):
    for view in (False, True):
        ours, _ = _pair(view)
        hook = _hook(ours, 2.0)
        ours.zero_grad(set_to_none=True)
        loss = ours(_batch(rank, 0))
        poison = float("nan") if rank == 0 else 1.0  # only rank 0's hidden.bias goes NaN
        (loss + (ours.module.hidden.bias * poison).sum()).backward()
        assert hook.ready
        stats = hook.grad_stats()
        bias_row = stats.names.index("hidden.bias")
        assert int(stats.nonfinite[bias_row]) == 24  # averaged: NaN on both ranks
        assert int(stats.nonfinite.sum()) == 24
        _assert_stats_equal_post_backward(stats, ours, 2.0)
        before = [g.clone() for g in _grads(ours)]
        with pytest.raises(RuntimeError, match="'hidden.bias' \\(24 NaN/Inf\\)"):
            hook.clip_grad_norm_(1.0, error_if_nonfinite=True)
        for grad, kept in zip(_grads(ours), before):
            torch.testing.assert_close(grad, kept, equal_nan=True, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="hidden.bias"):
            hook.get_total_norm(error_if_nonfinite=True)
        assert math.isnan(float(hook.clip_grad_norm_(1.0)))


def check_unused_parameters_with_find_unused(rank):
    for view in (False, True):
        ours, reference = _pair(view, find_unused=True)
        hook = _hook(ours, 2.0)
        # step 0: spare unused everywhere (no gradient); step 1: used on rank 1 only (its
        # average holds rank 1's half); step 2: used everywhere.
        for step, use_spare in enumerate((False, rank == 1, True)):
            for model in (ours, reference):
                _backward(model, rank, step, use_spare=use_spare)
            assert hook.ready, (view, step)
            stats = hook.grad_stats()
            assert ("spare.weight" in stats.names) == (step > 0), stats.names
            _assert_stats_equal_post_backward(stats, ours, 2.0)
            _assert_clips_like_torch(hook, ours, reference)


def check_globally_unused_parameter_keeping_its_gradient(rank):
    # DDP copies a kept gradient into the bucket even where the parameter went unused on
    # every rank, and leaves the gradient alone after: bucket and gradient agree without
    # zeroing (here they accumulate over steps).
    for view in (False, True):
        ours, reference = _pair(view, find_unused=True)
        hook = _hook(ours, 2.0)
        for step, use_spare in enumerate((True, False, False)):
            for model in (ours, reference):
                model(_batch(rank, step), use_spare=use_spare).backward()
            assert hook.ready, (view, step)
            assert ours.module.spare.weight.grad.abs().sum() > 0
            _assert_stats_equal_post_backward(hook.grad_stats(), ours, 2.0)
            _assert_clips_like_torch(hook, ours, reference)


def check_static_graph(rank):
    # DDP averages every bucket from its end-of-backward callback in the first iteration.
    ours, reference = _pair(view=True, static_graph=True)
    hook = _hook(ours, 2.0)
    for step in range(3):
        _backward(ours, rank, step)
        _backward(reference, rank, step)
        assert hook.ready, step
        _assert_stats_equal_post_backward(hook.grad_stats(), ours, 2.0)
        _assert_clips_like_torch(hook, ours, reference)


def check_bad_arguments(rank):
    import gradstats
    ours, _ = _pair(view=False)
    with pytest.raises(ValueError, match="norm type > 0 or inf"):
        gradstats.DDPStatsHook(ours, 0.0)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        gradstats.DDPStatsHook(ours.module)
    hook = _hook(ours)
    with pytest.raises(ValueError, match="max_norm"):
        hook.clip_grad_norm_(-1.0)
    forward_hooks = len(ours._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="once"):  # DDP takes one communication hook
        _hook(ours)
    assert len(ours._forward_pre_hooks) == forward_hooks  # the refused one left nothing


def check_triton_clip_marks_gradients_changed(rank):
    # A Triton kernel writes through raw pointers: the scale must still bump the version
    # counters, or the partials of the unclipped gradients would be reused (clipping twice).
    from gradstats.backend import interpreter_enabled, triton_importable
    if not (triton_importable() and interpreter_enabled()):
        return  # Triton on CPU tensors needs the interpreter (the CUDA case is the same code)
    previous = os.environ.get("GRADSTATS_BACKEND")
    os.environ["GRADSTATS_BACKEND"] = "triton"
    try:
        ours, reference = _pair(view=True)
        hook = _hook(ours, 2.0, histogram=False)
        _backward(ours, rank, 0)
        _backward(reference, rank, 0)
        for _ in range(2):  # the second call finds the clipped gradients
            _assert_clips_like_torch(hook, ours, reference)
            assert not hook.ready
    finally:
        if previous is None:
            del os.environ["GRADSTATS_BACKEND"]
        else:
            os.environ["GRADSTATS_BACKEND"] = previous


class _Experts(torch.nn.Module):
    def __init__(self, count):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(6, 2) for _ in range(count))

    def forward(self, x, chosen):
        return sum(self.experts[i](x).sum() for i in chosen)


def check_varying_unused_sets_keep_the_gather_cache_bounded(rank):
    import itertools

    from gradstats.ddp_hook import MAX_CACHED_GATHERS
    torch.manual_seed(0)
    experts = _Experts(8)
    DDP = torch.nn.parallel.DistributedDataParallel
    ours = DDP(copy.deepcopy(experts), find_unused_parameters=True, bucket_cap_mb=TINY_BUCKETS_MB)
    reference = DDP(copy.deepcopy(experts), find_unused_parameters=True,
                    bucket_cap_mb=TINY_BUCKETS_MB)
    hook = _hook(ours, 2.0, histogram=False)
    choices = list(itertools.combinations(range(8), 3))  # the same order on every rank
    assert len(choices) > MAX_CACHED_GATHERS + 8
    for step, chosen in enumerate(choices):
        for model in (ours, reference):
            model.zero_grad(set_to_none=True)
            model(_batch(rank, step), chosen).backward()
        total = hook.get_total_norm()
        if step % 10 == 0:
            _close(total, _float64_total(_grads(reference), 2.0))
    assert len(hook._gathers) <= MAX_CACHED_GATHERS, len(hook._gathers)
    _close(hook.clip_grad_norm_(0.5), torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5))
    _assert_grads_close(ours, reference)


class _ComplexNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.phase = torch.nn.Parameter(torch.randn(8, dtype=torch.complex64))
        self.frozen = torch.nn.Parameter(torch.randn(8, dtype=torch.complex64),
                                         requires_grad=False)

    def forward(self, x):
        return (self.phase * self.frozen * x).abs().sum()


def check_complex_parameters_are_refused(rank):
    # DDP averages a complex gradient as its real pairs, while the bucket's views count
    # complex elements: the per-bucket partials would read half of it.
    import gradstats
    model = torch.nn.parallel.DistributedDataParallel(_ComplexNet())
    with pytest.raises(TypeError, match="complex parameters, got 'phase';"):
        gradstats.DDPStatsHook(model)


class _SparseNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 6, sparse=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens)).sum()


def check_sparse_gradient_falls_back(rank):
    # DDP gives a sparse gradient a bucket of its own, with no flat buffer to split: the
    # hook must average it untouched and let the calls read p.grad.
    torch.manual_seed(0)
    net = _SparseNet()
    DDP = torch.nn.parallel.DistributedDataParallel
    ours, reference = DDP(copy.deepcopy(net)), DDP(copy.deepcopy(net))
    hook = _hook(ours, 2.0)
    for step in range(2):  # the first iteration's buckets, then the rebuilt ones
        for model in (ours, reference):
            model.zero_grad(set_to_none=True)
            model(torch.tensor([1, 2, 3 + rank + step])).backward()
        assert not hook.ready
        dense = [g.to_dense() for g in _grads(reference)]  # torch's clip takes no sparse
        expected = _float64_total(dense, 2.0)
        _close(hook.get_total_norm(), expected)
        _close(hook.clip_grad_norm_(0.5), expected)
        coef = 0.5 / (expected + 1e-6)
        for mine, theirs in zip(_grads(ours), dense, strict=True):
            _close(mine.to_dense(), theirs.double() * coef)


CHECKS = [
    check_grad_scaler_unscale_falls_back,
    check_clip_matches_torch_over_norm_types_and_bucket_view,
    check_several_buckets_are_used,
    check_grad_stats_match_post_backward_pass,
    check_grad_stats_with_max_norm_clips_like_torch,
    check_histogram_off_gives_no_histogram,
    check_no_sync_step_falls_back_then_sync_step_uses_partials,
    check_forward_after_backward_invalidates_partials,
    check_gradient_edit_after_backward_falls_back,
    check_wrapped_user_hook,
    check_nan_on_one_rank_raises_on_every_rank,
    check_unused_parameters_with_find_unused,
    check_globally_unused_parameter_keeping_its_gradient,
    check_static_graph,
    check_bad_arguments,
    check_triton_clip_marks_gradients_changed,
    check_varying_unused_sets_keep_the_gather_cache_bounded,
    check_complex_parameters_are_refused,
    check_sparse_gradient_falls_back,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__[len("check_"):])
def test_ddp_stats_hook(check):
    _assert_ok(check)


def test_grad_scaler_watch_counts_subclasses_that_define_their_own_unscale_():
    """ShardedGradScaler.unscale_ (and any subclass's own) never calls torch.amp's: unless
    wrapped too, its calls went uncounted and the hook clipped by the scaled norm."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from gradstats.ddp_hook import _GradScalerWatch

    class DefinedBefore(torch.amp.GradScaler):
        def unscale_(self, optimizer):  # changes gradients, calls no parent
            return None

    _GradScalerWatch.install()

    class DefinedAfter(DefinedBefore):
        def unscale_(self, optimizer):
            return None

    _GradScalerWatch.install()  # a second hook: nothing wrapped twice
    for scaler in (torch.amp.GradScaler, ShardedGradScaler, DefinedBefore, DefinedAfter):
        assert scaler.unscale_._gradstats_counted, scaler
        assert not getattr(scaler.unscale_.__wrapped__, "_gradstats_counted", False), scaler
    for scaler in (DefinedBefore("cpu"), DefinedAfter("cpu")):
        before = _GradScalerWatch.calls
        scaler.unscale_(None)
        assert _GradScalerWatch.calls == before + 1
