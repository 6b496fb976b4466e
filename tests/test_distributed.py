"""Sharded and replicated gradients across processes (gloo on the CPU): DTensor on 1-D and
2-D meshes, FSDP2, DDP, hand-sharded buffers (``process_group=``), NaN on one rank.

Each suite is one group of processes this file spawns itself (a spawn costs seconds), which
runs every check of the suite in order and writes each one's outcome to a file per rank;
the tests below read them. A suite that does not finish in time is killed and its
unfinished checks fail: a hang never blocks the run. Every check compares with one process
computing on the unsharded tensors (gradstats and torch), and with torch on the same
DTensors where torch can.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import tempfile
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from spawned_ranks import free_port, run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

SUITE_TIMEOUT_S = 150  # whole suite, spawn included; a collective times out after 30 s
BINS, MIN_EXP = 16, -8
NORM_TYPES = (2.0, 1.0, 3.0, math.inf)
# No fused power: torch composes them (per-tensor norms, then their p-"norm").
COMPOSED_NORM_TYPES = (0.0, -1.0, -0.5, -math.inf)


# -- spawning ---------------------------------------------------------------------------
def _rank_main(suite: str, rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GRADSTATS_TEST_OUTDIR=outdir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    outcomes = {}
    path = os.path.join(outdir, f"{suite}-{rank}.json")
    try:
        for check in SUITES[suite]:
            try:
                check(rank, world)
                outcomes[check.__name__] = "ok"
            except Exception:  # reported to the parent, which fails the test
                outcomes[check.__name__] = traceback.format_exc()
            with open(path, "w") as file:
                json.dump(outcomes, file)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_suite(suite: str, world: int) -> dict[str, list[str]]:
    """Each check's outcome on every rank ("ok" or a traceback; "unfinished")."""
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        run_ranks(_rank_main, [(suite, rank, world, port, outdir) for rank in range(world)],
                  SUITE_TIMEOUT_S)
        outcomes = {check.__name__: [] for check in SUITES[suite]}
        for rank in range(world):
            path = os.path.join(outdir, f"{suite}-{rank}.json")
            done = json.load(open(path)) if os.path.exists(path) else {}
            for name in outcomes:
                outcomes[name].append(done.get(name, f"unfinished on rank {rank} (timeout "
                                                      "or crash)"))
    return outcomes


_suite_cache: dict[str, dict[str, list[str]]] = {}


def _outcome(suite: str, world: int, check) -> None:
    if suite not in _suite_cache:
        _suite_cache[suite] = _run_suite(suite, world)
    failures = [o for o in _suite_cache[suite][check.__name__] if o != "ok"]
    assert not failures, failures[0]


# -- helpers run on each rank -------------------------------------------------------------
def _gradstats():
    import gradstats
    return gradstats


def _dparam(full_grad, mesh, placements):
    """A DTensor parameter (zeros) whose gradient is ``full_grad`` distributed."""
    from torch.distributed.tensor import distribute_tensor
    param = torch.nn.Parameter(distribute_tensor(torch.zeros_like(full_grad), mesh, placements))
    param.grad = distribute_tensor(full_grad.clone(), mesh, placements)
    return param


def _plain_params(full_grads):
    params = []
    for grad in full_grads:
        param = torch.nn.Parameter(torch.zeros_like(grad))
        param.grad = grad.clone()
        params.append(param)
    return params


def _full(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _close(actual, expected, rtol=2e-6, atol=1e-7):
    torch.testing.assert_close(_full(actual).double(), _full(expected).double(), rtol=rtol,
                               atol=atol, equal_nan=True)


def _check_stats_equal_one_process(dparams, full_grads, p):
    """grad_stats on the sharded params equals grad_stats and torch on the full grads."""
    gradstats = _gradstats()
    sharded = gradstats.grad_stats(dparams, p, num_bins=BINS, min_exp=MIN_EXP)
    single = gradstats.grad_stats(_plain_params(full_grads), p, num_bins=BINS, min_exp=MIN_EXP)
    torch.testing.assert_close(sharded.hist, single.hist, rtol=0, atol=0)
    torch.testing.assert_close(sharded.nonfinite, single.nonfinite, rtol=0, atol=0)
    torch.testing.assert_close(sharded.numel, single.numel, rtol=0, atol=0)
    _close(sharded.norms, single.norms)
    _close(sharded.total_norm, single.total_norm)
    torch_norms = torch.stack([torch.linalg.vector_norm(g.double(), p) for g in full_grads])
    _close(sharded.norms, torch_norms, rtol=1e-5)


class _CountCollectives:
    """Records the op of every ``dist.all_reduce`` call (what gradstats issues) while active."""

    def __enter__(self):
        self.calls = []
        self._original = original = dist.all_reduce

        def counted(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append(op)
            return original(tensor, op=op, group=group, async_op=async_op)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


# -- suite "mesh1d": 2 ranks ---------------------------------------------------------------
def _mesh1d_grads():
    torch.manual_seed(0)
    return {  # name: (full gradient, placements), uneven and empty shards on 2 ranks
        "uneven": (torch.randn(5, 3), "S0"),      # rows 3 + 2
        "one_row": (torch.randn(1, 4) * 3, "S0"),  # rows 1 + 0: an empty shard
        "replicated": (torch.randn(3) * 0.5, "R"),
        "cols": (torch.randn(4, 6) * 1e-3, "S1"),
        "zeros": (torch.zeros(2, 2), "S0"),
    }


def _mesh1d_params(mesh, grads):
    from torch.distributed.tensor import Replicate, Shard
    placements = {"S0": [Shard(0)], "S1": [Shard(1)], "R": [Replicate()]}
    return [_dparam(grad, mesh, placements[kind]) for grad, kind in grads.values()]


def check_mesh1d_stats_equal_one_process(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    grads = _mesh1d_grads()
    params = _mesh1d_params(mesh, grads)
    assert params[1].grad.to_local().numel() == (4 if rank == 0 else 0)  # an empty shard
    for p in NORM_TYPES:
        _check_stats_equal_one_process(params, [g for g, _ in grads.values()], p)


def check_mesh1d_total_norm_type_and_value(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    grads = _mesh1d_grads()
    params = _mesh1d_params(mesh, grads)
    full = [g for g, _ in grads.values()]
    for p in NORM_TYPES:
        total = gradstats.get_total_norm([q.grad for q in params], p)
        assert isinstance(total, DTensor) and total.placements == (Replicate(),), total
        assert total.device_mesh == mesh
        _close(total, torch.nn.utils.get_total_norm(full, p))
        _close(total.to_local(), total.full_tensor())  # no communication needed to read it
        if p != math.inf:  # torch raises on the empty shard for the inf-norm
            _close(total, torch.nn.utils.get_total_norm([q.grad for q in params], p))


def check_mesh1d_inf_norm_empty_shard_where_torch_raises(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    grads = _mesh1d_grads()
    params = _mesh1d_params(mesh, grads)
    if rank == 1:  # torch's own failure, on the rank with the empty shard only
        with pytest.raises(RuntimeError, match="empty tensor"):
            torch.nn.utils.get_total_norm([params[1].grad.to_local()], math.inf)
    total = gradstats.fused_clip_grad_norm_(params, 0.1, math.inf)
    expected_params = _plain_params([g for g, _ in grads.values()])
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 0.1, math.inf)
    _close(total, expected)
    for param, reference in zip(params, expected_params):
        _close(param.grad, reference.grad)


def check_mesh1d_clip_equals_torch_on_dtensors_and_one_process(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    grads = _mesh1d_grads()
    full = [g for g, _ in grads.values()]
    for p in (2.0, 1.0, 3.0):
        ours = _mesh1d_params(mesh, grads)
        theirs = _mesh1d_params(mesh, grads)
        single = _plain_params(full)
        total = gradstats.fused_clip_grad_norm_(ours, 0.05, p)
        torch_total = torch.nn.utils.clip_grad_norm_(theirs, 0.05, p)
        single_total = torch.nn.utils.clip_grad_norm_(single, 0.05, p)
        _close(total, torch_total)
        _close(total, single_total)
        for a, b, c in zip(ours, theirs, single):
            assert a.grad.placements == b.grad.placements  # scaled in place, no redistribution
            _close(a.grad, b.grad)
            _close(a.grad, c.grad)


def _composed_grads():
    """``_mesh1d_grads`` and a gradient with one zero, in rank 1's shard: |0|^p is inf for
    p < 0, so its norm is 0 (and the -inf-norm's minimum 0) wherever the zero sits."""
    grads = _mesh1d_grads()
    one_zero = torch.randn(4, 3) + 0.5
    one_zero[3, 2] = 0.0  # rows 2 + 2
    grads["one_zero"] = (one_zero, "S0")
    return grads


def check_mesh1d_composed_norm_types_equal_torch_and_one_process(rank, world):
    """Norm types 0, < 0 and -inf: per-shard partials combined across ranks, then torch's
    composition. torch's DTensor norms raise on an empty shard for p < 0 and -inf (on that
    rank alone: the other waits in a collective), so torch's side leaves it out there."""
    from torch.distributed.device_mesh import init_device_mesh
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    grads = _composed_grads()
    names = list(grads)
    params = _mesh1d_params(mesh, grads)
    full = [g for g, _ in grads.values()]
    if rank == 1:  # torch's own failure on the empty shard
        with pytest.raises(RuntimeError, match="empty tensor"):
            torch.linalg.vector_norm(params[1].grad.to_local(), -1.0)
    subsets = {  # no zero anywhere (non-trivial totals for p < 0), without or with the
        "even": ["uneven", "replicated", "cols"],  # empty shard, and everything
        "with_empty": ["uneven", "one_row", "replicated", "cols"],
        "all": names,
    }
    for p in COMPOSED_NORM_TYPES:
        _check_stats_equal_one_process(params, full, p)
        for subset, kept in subsets.items():
            rows = [names.index(name) for name in kept]
            total = gradstats.get_total_norm([params[i].grad for i in rows], p)
            _close(total, torch.nn.utils.get_total_norm([full[i] for i in rows], p))
            if subset == "even" or p == 0.0:
                torch_total = torch.nn.utils.get_total_norm([params[i].grad for i in rows], p)
                _close(total, torch_total)
        rows = [names.index(name) for name in subsets["even"]]
        single = _plain_params([full[i] for i in rows])
        single_total = torch.nn.utils.get_total_norm([q.grad for q in single], p)
        max_norm = 0.5 * single_total.item()  # the coefficient is 0.5: every gradient changes
        ours, theirs = _mesh1d_params(mesh, grads), _mesh1d_params(mesh, grads)
        total = gradstats.fused_clip_grad_norm_([ours[i] for i in rows], max_norm, p)
        torch_total = torch.nn.utils.clip_grad_norm_([theirs[i] for i in rows], max_norm, p)
        torch.nn.utils.clip_grad_norm_(single, max_norm, p)
        _close(total, torch_total)
        _close(total, single_total)
        for i, reference in zip(rows, single):
            _close(ours[i].grad, theirs[i].grad)
            _close(ours[i].grad, reference.grad)
        assert not torch.equal(_full(ours[rows[0]].grad), full[rows[0]])


def check_mesh1d_clip_grads_with_norm_takes_torch_dtensor_total(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    grads = _mesh1d_grads()
    ours, theirs = _mesh1d_params(mesh, grads), _mesh1d_params(mesh, grads)
    even = [0, 2, 3]  # no empty shard: torch's inf-norm works (and is a Partial(max) DTensor)
    for p in (2.0, math.inf):
        torch_total = torch.nn.utils.get_total_norm([theirs[i].grad for i in even], p)
        gradstats.clip_grads_with_norm_([ours[i] for i in even], 0.01, torch_total)
        torch.nn.utils.clip_grads_with_norm_([theirs[i] for i in even], 0.01, torch_total)
        for i in even:
            _close(ours[i].grad, theirs[i].grad)


def check_mesh1d_partial_gradient(rank, world):
    """A Partial gradient: statistics of the sum, scaled as partials (their sum scales)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    full = torch.randn(3, 5)
    local = full * (0.25 if rank == 0 else 0.75)  # the two partials add up to `full`
    partial = DTensor.from_local(local, mesh, [Partial()], run_check=False)
    for p in (2.0, math.inf):
        stats = gradstats.grad_stats(_with_grad(partial), p,
                                     num_bins=BINS, min_exp=MIN_EXP)
        single = gradstats.grad_stats(_plain_params([full]), p, num_bins=BINS, min_exp=MIN_EXP)
        _close(stats.total_norm, single.total_norm)
        torch.testing.assert_close(stats.hist, single.hist, rtol=0, atol=0)
    param = _with_grad(DTensor.from_local(local.clone(), mesh, [Partial()], run_check=False))
    total = gradstats.fused_clip_grad_norm_(param, 0.5)
    reference = _plain_params([full])
    expected = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    _close(total, expected)
    assert param[0].grad.placements == (Partial(),)
    _close(param[0].grad.full_tensor(), reference[0].grad)


def check_mesh1d_scaling_partial_gradients_by_a_given_total_needs_no_collective(rank, world):
    """clip_grads_with_norm_ only scales: Partial gradients are scaled as they are, with no
    replicated copy (torch issues none either)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial
    from torch.distributed.tensor.debug import CommDebugMode
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    local = torch.full((3, 5), 1.0 + rank)
    param = _with_grad(DTensor.from_local(local.clone(), mesh, [Partial()], run_check=False))
    with CommDebugMode() as comm:
        gradstats.clip_grads_with_norm_(param, 1.0, torch.tensor(4.0))
    assert comm.get_total_counts() == 0
    assert param[0].grad.placements == (Partial(),)
    torch.testing.assert_close(param[0].grad.to_local(), local * (1.0 / (4.0 + 1e-6)))


def check_mesh1d_dtensors_mixed_with_plain_tensors_are_refused_on_every_rank(rank, world):
    """A plain tensor beside DTensors may differ per rank (a NaN in it would send one rank
    alone into a collective): refused, as torch refuses it, before anything is scaled."""
    from torch.distributed.device_mesh import init_device_mesh
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    params = _mesh1d_params(mesh, _mesh1d_grads())[:2] + _plain_params([torch.ones(3)])
    before = [q.grad.clone() for q in params]
    for call in (lambda: gradstats.fused_clip_grad_norm_(params, 0.01),
                 lambda: gradstats.grad_stats(params),
                 lambda: gradstats.get_total_norm([q.grad for q in params])):
        with pytest.raises(ValueError, match="mix DTensor and plain tensors"):
            call()
    for param, saved in zip(params, before):
        torch.testing.assert_close(param.grad, saved)


def _with_grad(grad):
    param = torch.nn.Parameter(torch.zeros_like(grad))
    param.grad = grad
    return [param]


def check_mesh1d_nan_on_one_rank_every_rank_raises(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    grads = _mesh1d_grads()
    params = _mesh1d_params(mesh, grads)
    if rank == 1:
        params[0].grad.to_local()[0, 1] = math.nan  # rank 1's shard of "uneven" only
    before = [q.grad.to_local().clone() for q in params]
    for p in (2.0, math.inf, -1.0, -math.inf):
        with pytest.raises(RuntimeError, match=r"parameter 0 \(1 NaN/Inf\)"):
            gradstats.fused_clip_grad_norm_(params, 0.1, p, error_if_nonfinite=True)
        for param, saved in zip(params, before):  # nothing modified, on any rank
            torch.testing.assert_close(param.grad.to_local(), saved, equal_nan=True)
        stats = gradstats.grad_stats(params, p)
        assert stats.nonfinite.tolist() == [1, 0, 0, 0, 0]
        assert math.isnan(stats.total_norm.item()) and math.isnan(stats.norms[0].item())
        total = gradstats.get_total_norm([q.grad for q in params], p)
        assert math.isnan(total.to_local().item())  # the same on every rank


def check_mesh1d_one_collective_per_kind(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    params = _mesh1d_params(mesh, _mesh1d_grads())
    SUM, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX
    for p, for_stats, for_clip in ((2.0, [SUM], [SUM]), (math.inf, [MAX, SUM], [MAX]),
                                   (0.0, [SUM], [SUM]), (-0.5, [SUM], [SUM]),
                                   (-math.inf, [MAX, SUM], [MAX])):
        with _CountCollectives() as counted:
            gradstats.grad_stats(params, p, max_norm=1.0)
        assert counted.calls == for_stats, counted.calls
        with _CountCollectives() as counted:
            gradstats.fused_clip_grad_norm_(params, 1.0, p)
            gradstats.get_total_norm([q.grad for q in params], p).full_tensor()
        assert counted.calls == for_clip * 2, counted.calls


def check_mesh1d_no_more_collectives_than_torch(rank, world):
    """torch's clip and total norm on the same DTensors (no empty shard: torch's inf-norm
    fails there), counted by DTensor's own CommDebugMode, which sees both kinds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    gradstats = _gradstats()
    mesh = init_device_mesh("cpu", (world,))
    grads = _mesh1d_grads()
    del grads["one_row"]
    for p in (2.0, math.inf) + COMPOSED_NORM_TYPES:
        counts = []
        for module in (torch.nn.utils, gradstats):
            params = _mesh1d_params(mesh, grads)
            with CommDebugMode() as comm:
                module.clip_grad_norm_(params, 0.01, p).full_tensor()
                module.get_total_norm([q.grad for q in params], p).full_tensor()
            counts.append(comm.get_total_counts())
        torch_count, ours = counts
        assert 0 < ours <= torch_count, (p, counts)


# -- hand-sharded buffers (process_group=) ---------------------------------------------------
def check_process_group_hand_sharded(rank, world):
    gradstats = _gradstats()
    torch.manual_seed(2)
    full = [torch.randn(7), torch.randn(3) * 10, torch.randn(1)]
    # ZeRO-style: rank r keeps its slice of each flat gradient (uneven, one empty)
    bounds = [(0, 4, 7), (0, 3, 3), (0, 1, 1)]
    local = [g[b[rank]:b[rank + 1]] for g, b in zip(full, bounds)]
    group = dist.group.WORLD
    for p in NORM_TYPES:
        stats = gradstats.grad_stats(_plain_params(local), p, num_bins=BINS, min_exp=MIN_EXP,
                                     process_group=group)
        single = gradstats.grad_stats(_plain_params(full), p, num_bins=BINS, min_exp=MIN_EXP)
        torch.testing.assert_close(stats.hist, single.hist, rtol=0, atol=0)
        torch.testing.assert_close(stats.numel, single.numel, rtol=0, atol=0)
        _close(stats.norms, single.norms)
        total = gradstats.get_total_norm(local, p, process_group=group)
        assert type(total) is torch.Tensor
        _close(total, torch.nn.utils.get_total_norm(full, p))
        params, reference = _plain_params(local), _plain_params(full)
        total = gradstats.fused_clip_grad_norm_(params, 0.2, p, process_group=group)
        _close(total, torch.nn.utils.clip_grad_norm_(reference, 0.2, p))
        for param, ref, b in zip(params, reference, bounds):
            _close(param.grad, ref.grad[b[rank]:b[rank + 1]])
    for p in COMPOSED_NORM_TYPES:  # rank 1's shard of the last tensor is empty
        stats = gradstats.grad_stats(_plain_params(local), p, process_group=group)
        _close(stats.norms, torch.stack([torch.linalg.vector_norm(g, p) for g in full]))
        total = gradstats.get_total_norm(local, p, process_group=group)
        _close(total, torch.nn.utils.get_total_norm(full, p))
    monitor = gradstats.GradMonitor(_plain_params(local), sinks=None, process_group=group)
    _close(monitor.step(), torch.nn.utils.get_total_norm(full))
    monitor.close()


def _torchtitan_clip(parameters, max_norm, norm_type, pp_group, module):
    """torchtitan's ``clip_grad_norm_`` (its dist utils) with ``module``'s two functions:
    the DTensor total made plain, combined over the pipeline group, then the scale."""
    from torch.distributed.tensor import DTensor
    parameters = list(parameters)
    total = module.get_total_norm([q.grad for q in parameters], norm_type)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if norm_type == math.inf:
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pp_group)
    else:
        total **= norm_type
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_group)
        total **= 1.0 / norm_type
    module.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def check_torchtitan_style_loop_with_pipeline_stages(rank, world):
    """A (pp, dp) world mesh as torchtitan builds it, one stage per rank: each stage's
    DTensor parameters on its dp sub-mesh; gradstats' two functions in place of torch's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    gradstats = _gradstats()
    world_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("pp", "dp"))
    dp_mesh, pp_group = world_mesh["dp"], world_mesh["pp"].get_group()
    full = [g for g, _ in _mesh1d_grads().values()]
    stage = full[:3] if rank == 0 else full[3:]
    for p in (2.0, math.inf):
        ours = [_dparam(g, dp_mesh, [Shard(0)]) for g in stage]
        theirs = [_dparam(g, dp_mesh, [Shard(0)]) for g in stage]
        total = _torchtitan_clip(ours, 0.05, p, pp_group, gradstats)
        expected = _torchtitan_clip(theirs, 0.05, p, pp_group, torch.nn.utils)
        _close(total, expected)
        _close(total, torch.nn.utils.get_total_norm(full, p))
        for a, b in zip(ours, theirs):
            _close(a.grad, b.grad)


# -- DDP: plain tensors, no communication ----------------------------------------------------
def _mlp():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3),
                               torch.nn.Linear(3, 1, bias=False))


def check_ddp_with_and_without_bucket_view(rank, world):
    from torch.nn.parallel import DistributedDataParallel
    gradstats = _gradstats()
    torch.manual_seed(4)
    batches = torch.randn(world, 6, 5)
    for as_view in (False, True):
        model = DistributedDataParallel(_mlp(), gradient_as_bucket_view=as_view,
                                        bucket_cap_mb=1)
        model(batches[rank]).square().mean().backward()
        reference = _mlp()  # one process: the mean loss over every rank's batch
        reference(batches.reshape(-1, 5)).square().mean().backward()
        grads = [q.grad for q in model.parameters()]
        if as_view:  # views into one flat bucket: most start off a 16-byte boundary
            assert any(g.data_ptr() % 16 for g in grads)
        torch_params = [_with_grad(g.clone())[0] for g in grads]
        for p in NORM_TYPES:
            with _CountCollectives() as counted:
                stats = gradstats.grad_stats(model, p, num_bins=BINS, min_exp=MIN_EXP)
            assert counted.calls == []  # already identical after DDP's all-reduce
            assert stats.names == [name for name, _ in reference.named_parameters()]
            single = gradstats.grad_stats(reference, p, num_bins=BINS, min_exp=MIN_EXP)
            _close(stats.norms, single.norms, rtol=1e-5)
            local = gradstats.grad_stats(_plain_params(grads), p, num_bins=BINS,
                                         min_exp=MIN_EXP)
            torch.testing.assert_close(stats.hist, local.hist, rtol=0, atol=0)
            _close(stats.norms, local.norms)
        total = gradstats.fused_clip_grad_norm_(model.parameters(), 0.01)
        expected = torch.nn.utils.clip_grad_norm_(torch_params, 0.01)
        _close(total, expected)
        for param, ref in zip(model.parameters(), torch_params):
            _close(param.grad, ref.grad)


# -- FSDP2 -----------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 3 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(3 * dim, dim))

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class _TinyTransformer(torch.nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList([_Block(dim), _Block(dim)])
        self.head = torch.nn.Linear(dim, 1)  # a 1-row weight: empty shards on other ranks

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean()


def check_fsdp2_equals_torch_and_one_process(rank, world):
    gradstats = _gradstats()
    model, reference = _fsdp_pair(world, seed=5)
    tokens = torch.randint(0, 11, (2, 5))  # the same batch on every rank: grads as one process
    model(tokens).backward()
    reference(tokens).backward()
    assert model.head.weight.grad.to_local().numel() == (6 if rank == 0 else 0)
    names = [name for name, _ in reference.named_parameters()]
    full = [q.grad for q in reference.parameters()]
    saved = [q.grad.to_local().clone() for q in model.parameters()]
    for p in NORM_TYPES:
        stats = gradstats.grad_stats(model, p, num_bins=BINS, min_exp=MIN_EXP)
        assert stats.names == names  # the unsharded model's names
        single = gradstats.grad_stats(reference, p, num_bins=BINS, min_exp=MIN_EXP)
        _close(stats.norms, single.norms, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.numel, single.numel, rtol=0, atol=0)
        # FSDP averages identical gradients: the same values up to a rounding at most
        assert (stats.hist - single.hist).abs().sum() <= 2
    for p in (2.0, math.inf):
        total = gradstats.fused_clip_grad_norm_(model, 0.05, p)
        ours = [q.grad.full_tensor() for q in model.parameters()]
        for param, values in zip(model.parameters(), saved):
            param.grad.to_local().copy_(values)
        if p != math.inf:  # torch raises on the empty shards for the inf-norm
            torch_total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, p)
            _close(total, torch_total)
            for mine, param in zip(ours, model.parameters()):
                _close(mine, param.grad, atol=1e-6)
        for param, values in zip(model.parameters(), saved):
            param.grad.to_local().copy_(values)
        single_params = _plain_params(full)
        single_total = torch.nn.utils.clip_grad_norm_(single_params, 0.05, p)
        _close(total, single_total, rtol=1e-5)
        for mine, ref in zip(ours, single_params):
            _close(mine, ref.grad, rtol=1e-5, atol=1e-6)


def _fsdp_pair(world, seed: int = 7):
    """(the small transformer under FSDP2 fully_shard, an unsharded copy of it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    reference = _TinyTransformer()
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, reference


def check_fsdp2_gradients_keep_their_specs_so_layouts_are_cached(rank, world):
    """FSDP2 builds each step's gradient on its parameter's one DTensorSpec: the second
    step finds every layout in distributed._layouts_by_spec, and the figures stay right."""
    gradstats = _gradstats()
    from gradstats import distributed
    model, reference = _fsdp_pair(world)
    tokens = torch.randint(0, 11, (2, 5))
    specs, totals = [], []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        model(tokens).backward()
        reference(tokens).backward()
        specs.append([q.grad._spec for q in model.parameters()])
        totals.append((gradstats.get_total_norm([q.grad for q in model.parameters()]),
                       torch.nn.utils.get_total_norm([q.grad for q in reference.parameters()])))
    assert all(a is b for a, b in zip(*specs))  # the cache's premise
    cached = distributed._layouts_by_spec._entries
    assert all(cached[id(spec)][0]() is spec for spec in specs[1])
    for ours, expected in totals:
        _close(ours.full_tensor(), expected)


def check_routed_torch_clipping_runs_gradstats_on_fsdp2(rank, world):
    """route_torch_clipping(): torch.nn.utils' functions, called on FSDP2 gradients, run
    gradstats (its collectives are ``dist.all_reduce`` calls, torch's are not) and give
    torch's results."""
    from torch.distributed.tensor import DTensor
    gradstats = _gradstats()
    from gradstats import clip as gs_clip
    model, _ = _fsdp_pair(world)
    model(torch.arange(10).reshape(2, 5) % 11).backward()
    saved = [q.grad.to_local().clone() for q in model.parameters()]

    def restore():
        for param, values in zip(model.parameters(), saved):
            param.grad.to_local().copy_(values)
    torch_total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    torch_grads = [q.grad.full_tensor() for q in model.parameters()]
    restore()
    calls = []
    real = gs_clip.fused_clip_grad_norm_
    gs_clip.fused_clip_grad_norm_ = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with gradstats.route_torch_clipping(), _CountCollectives() as counted:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    finally:
        gs_clip.fused_clip_grad_norm_ = real
    assert calls == [1] and counted.calls == [dist.ReduceOp.SUM]
    assert isinstance(total, DTensor)
    _close(total, torch_total)
    for param, expected in zip(model.parameters(), torch_grads):
        _close(param.grad, expected, atol=1e-6)
    restore()  # the two-step form (accelerate, torchtitan): get_total_norm, then the scale
    with gradstats.route_torch_clipping(), _CountCollectives() as counted:
        grads = [q.grad for q in model.parameters()]
        total = torch.nn.utils.get_total_norm(grads)
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), 0.05, total)
    assert counted.calls == [dist.ReduceOp.SUM]
    _close(total, torch_total)
    for param, expected in zip(model.parameters(), torch_grads):
        _close(param.grad, expected, atol=1e-6)


def check_monitor_fsdp2_records_equal_one_process(rank, world):
    """Rank 0 writes the global figures, equal to one process's; all_ranks: each writes."""
    from torch.distributed.tensor import DTensor
    gradstats = _gradstats()
    outdir = os.environ["GRADSTATS_TEST_OUTDIR"]
    model, reference = _fsdp_pair(world)
    shared = os.path.join(outdir, "fsdp.jsonl")
    options = dict(hist_every=1, num_bins=BINS, min_exp=MIN_EXP)
    monitor = gradstats.GradMonitor(model, sinks=[f"jsonl:{shared}"], **options)
    own = os.path.join(outdir, f"ref-{rank}.jsonl")
    single = gradstats.GradMonitor(reference, sinks=[f"jsonl:{own}"], all_ranks=True, **options)
    each = os.path.join(outdir, f"each-{rank}.jsonl")
    every_rank = gradstats.GradMonitor(model, sinks=[f"jsonl:{each}"], all_ranks=True,
                                       **options)
    for step in range(2):
        tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(step))
        model(tokens).backward()
        reference(tokens).backward()
        every_rank.step()
        total = monitor.step(max_norm=0.05)
        assert isinstance(total, DTensor)
        single.step(max_norm=0.05)
        model.zero_grad()
        reference.zero_grad()
    for m in (monitor, single, every_rank):
        m.close()
    dist.barrier()
    records, expected = gradstats.read_jsonl(shared), gradstats.read_jsonl(own)
    assert len(records) == 2  # rank 0 alone wrote the shared file
    assert len(gradstats.read_jsonl(each)) == 2  # and every rank its own when asked
    for record, ref in zip(records, expected):
        assert record.norms.keys() == ref.norms.keys()
        for name, norm in ref.norms.items():
            assert math.isclose(record.norms[name], norm, rel_tol=1e-5, abs_tol=1e-7), name
        assert math.isclose(record.total_norm, ref.total_norm, rel_tol=1e-5)
        assert math.isclose(record.clip_coef, ref.clip_coef, rel_tol=1e-5)
        assert record.nonfinite == ref.nonfinite == {}
        for name, counts in ref.hist.items():
            assert sum(abs(a - b) for a, b in zip(record.hist[name], counts)) <= 2, name


def check_monitor_nan_on_one_rank_every_rank_raises_or_skips(rank, world):
    gradstats = _gradstats()
    model, _ = _fsdp_pair(world)
    model(torch.arange(10).reshape(2, 5)).backward()
    if rank == 1:  # rank 1's shard of one gradient only
        next(iter(model.parameters())).grad.to_local().view(-1)[0] = math.nan
    raising = gradstats.GradMonitor(model, sinks=None, on_nonfinite="raise")
    with pytest.raises(RuntimeError, match="non-finite gradients at step 0"):
        raising.step(max_norm=1.0)
    raising.close()
    before = [q.to_local().clone() for q in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping = gradstats.GradMonitor(model, sinks=None, on_nonfinite="skip",
                                         optimizer=optimizer)
        skipping.step(max_norm=1.0)
        optimizer.step()
        skipping.close()
    for param, saved in zip(model.parameters(), before):  # no rank updated
        torch.testing.assert_close(param.to_local(), saved)
    assert _nonfinite_warnings(caught) == (1 if rank == 0 else 0)  # said once, by rank 0


def _nonfinite_warnings(caught) -> int:
    gradstats = _gradstats()
    return sum(issubclass(w.category, gradstats.NonFiniteGradientWarning) for w in caught)


def check_monitor_warns_once_per_global_event(rank, world):
    """A NaN in one rank's shard is one global event: the writing rank warns (rank 0, or
    every rank with all_ranks=True), once per run of non-finite steps; a callable is
    called on every rank."""
    gradstats = _gradstats()
    model, _ = _fsdp_pair(world)
    for all_ranks in (False, True):
        called = []
        monitors = [gradstats.GradMonitor(model, sinks=None, all_ranks=all_ranks),
                    gradstats.GradMonitor(model, sinks=None,
                                          on_nonfinite=lambda step, _: called.append(step))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):  # NaN at steps 0 and 1: one run, one warning
                model.zero_grad()
                model(torch.arange(10).reshape(2, 5)).backward()
                if rank == 1 and step < 2:
                    next(iter(model.parameters())).grad.to_local().view(-1)[0] = math.nan
                for monitor in monitors:
                    monitor.step()
            for monitor in monitors:
                monitor.close()
        assert _nonfinite_warnings(caught) == (1 if all_ranks or rank == 0 else 0), caught
        assert called == [0, 1]


def check_monitor_nan_origin_on_a_silent_rank_is_logged(rank, world):
    """Tracked activations are each rank's own: a NaN born in rank 1's forward reaches
    every rank's gradients, but only rank 1 knows where it was born. Rank 0 warns; rank 1
    does not warn, and logs the origin, which would otherwise be lost."""
    import logging
    gradstats = _gradstats()
    model, _ = _fsdp_pair(world)
    if rank == 1:
        def poison(module, inputs, output):
            output = output.clone()
            output[0, 0, 0] = math.nan
            return output
        model.embed.register_forward_hook(poison)
    monitor = gradstats.GradMonitor(model, sinks=None, track_activations=True)
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("gradstats")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(torch.arange(10).reshape(2, 5)).backward()
            monitor.step()
            monitor.close()
    finally:
        logger.removeHandler(handler)
    assert _nonfinite_warnings(caught) == (1 if rank == 0 else 0), caught
    born = [message for message in logged if "born in module 'embed' (forward)" in message]
    assert len(born) == (1 if rank == 1 else 0), logged


# -- suite "mesh2d": 4 ranks -----------------------------------------------------------------
def _mesh2d_setup(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    mesh1d = init_device_mesh("cpu", (world,))
    torch.manual_seed(6)
    R, S0, S1 = Replicate(), Shard(0), Shard(1)
    layout = [  # (full gradient, mesh, placements)
        (torch.randn(6, 4), mesh2d, [S0, R]),
        (torch.randn(5, 3) * 2, mesh2d, [R, S0]),    # uneven over tp
        (torch.randn(4, 4), mesh2d, [S0, S1]),       # sharded on both dims
        (torch.randn(3) * 0.1, mesh2d, [R, R]),
        (torch.randn(1, 2) * 5, mesh2d, [R, S0]),    # an empty shard on tp rank 1
        (torch.randn(7, 2), mesh1d, [S0]),           # another mesh (a pipeline stage, EP)
        (torch.randn(2, 3), mesh1d, [S0]),           # empty on ranks 2 and 3
    ]
    params = [_dparam(grad, mesh, placements) for grad, mesh, placements in layout]
    return params, [grad for grad, _, _ in layout]


def check_mesh2d_and_two_meshes_equal_one_process(rank, world):
    params, full = _mesh2d_setup(world)
    for p in NORM_TYPES:
        _check_stats_equal_one_process(params, full, p)


def check_mesh2d_clip_equals_torch_and_one_process(rank, world):
    gradstats = _gradstats()
    _, full = _mesh2d_setup(world)
    for p in (2.0, math.inf):
        ours, _ = _mesh2d_setup(world)
        theirs, _ = _mesh2d_setup(world)
        total = gradstats.fused_clip_grad_norm_(ours, 0.1, p)
        single = _plain_params(full)
        _close(total, torch.nn.utils.clip_grad_norm_(single, 0.1, p))
        for mine, ref in zip(ours, single):
            _close(mine.grad, ref.grad)
        if p == 2.0:  # torch takes one mesh at a time; the 2-D mesh alone:
            torch_total = torch.nn.utils.get_total_norm([q.grad for q in theirs[:5]], p)
            ours_total = gradstats.get_total_norm([q.grad for q in theirs[:5]], p)
            assert ours_total.placements == torch_total.placements
            _close(ours_total, torch_total)


def check_mesh2d_composed_norm_types_equal_torch_and_one_process(rank, world):
    """Norm types 0, < 0 and -inf on the 2-D mesh and a second mesh (empty shards among
    them): as one process; and as torch on the 2-D mesh's gradients without an empty
    shard (torch raises on one for p < 0 and -inf), with no more collectives than it."""
    from torch.distributed.tensor.debug import CommDebugMode
    gradstats = _gradstats()
    params, full = _mesh2d_setup(world)
    for p in COMPOSED_NORM_TYPES:
        _check_stats_equal_one_process(params, full, p)
        single = _plain_params(full)
        max_norm = 0.5 * torch.nn.utils.get_total_norm(full, p).item()
        ours, _ = _mesh2d_setup(world)
        total = gradstats.fused_clip_grad_norm_(ours, max_norm, p)
        _close(total, torch.nn.utils.clip_grad_norm_(single, max_norm, p))
        for mine, ref in zip(ours, single):
            _close(mine.grad, ref.grad)
        counts, totals, grads = [], [], []
        for module in (torch.nn.utils, gradstats):
            on_2d, _ = _mesh2d_setup(world)
            with CommDebugMode() as comm:
                totals.append(module.clip_grad_norm_(on_2d[:4], max_norm, p).full_tensor())
            counts.append(comm.get_total_counts())
            grads.append([q.grad.full_tensor() for q in on_2d[:4]])
        _close(totals[1], totals[0])
        for mine, theirs in zip(grads[1], grads[0]):
            _close(mine, theirs)
        assert 0 < counts[1] <= counts[0], (p, counts)


def check_mesh2d_one_collective_per_mesh_dim(rank, world):
    gradstats = _gradstats()
    params, _ = _mesh2d_setup(world)
    # dp and tp of the 2-D mesh, and the 1-D mesh: three groups, one vector each.
    with _CountCollectives() as counted:
        gradstats.grad_stats(params, 2.0)
    assert counted.calls == [dist.ReduceOp.SUM] * 3, counted.calls
    with _CountCollectives() as counted:
        gradstats.get_total_norm([q.grad for q in params[:5]], math.inf)
    assert counted.calls == [dist.ReduceOp.MAX] * 2, counted.calls  # dp, tp


def check_mesh2d_nan_on_one_rank_every_rank_raises(rank, world):
    gradstats = _gradstats()
    params, _ = _mesh2d_setup(world)
    if rank == 3:
        params[2].grad.to_local()[0, 0] = math.inf
    with pytest.raises(RuntimeError, match=r"parameter 2 \(1 NaN/Inf\)"):
        gradstats.fused_clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


SUITES = {
    "mesh1d": [
        check_mesh1d_stats_equal_one_process,
        check_mesh1d_total_norm_type_and_value,
        check_mesh1d_inf_norm_empty_shard_where_torch_raises,
        check_mesh1d_clip_equals_torch_on_dtensors_and_one_process,
        check_mesh1d_composed_norm_types_equal_torch_and_one_process,
        check_mesh1d_clip_grads_with_norm_takes_torch_dtensor_total,
        check_mesh1d_partial_gradient,
        check_mesh1d_scaling_partial_gradients_by_a_given_total_needs_no_collective,
        check_mesh1d_dtensors_mixed_with_plain_tensors_are_refused_on_every_rank,
        check_mesh1d_nan_on_one_rank_every_rank_raises,
        check_mesh1d_one_collective_per_kind,
        check_mesh1d_no_more_collectives_than_torch,
        check_process_group_hand_sharded,
        check_torchtitan_style_loop_with_pipeline_stages,
        check_ddp_with_and_without_bucket_view,
        check_fsdp2_equals_torch_and_one_process,
        check_routed_torch_clipping_runs_gradstats_on_fsdp2,
        check_fsdp2_gradients_keep_their_specs_so_layouts_are_cached,
        check_monitor_fsdp2_records_equal_one_process,
        check_monitor_nan_on_one_rank_every_rank_raises_or_skips,
        check_monitor_warns_once_per_global_event,
        check_monitor_nan_origin_on_a_silent_rank_is_logged,
    ],
    "mesh2d": [
        check_mesh2d_and_two_meshes_equal_one_process,
        check_mesh2d_clip_equals_torch_and_one_process,
        check_mesh2d_composed_norm_types_equal_torch_and_one_process,
        check_mesh2d_one_collective_per_mesh_dim,
        check_mesh2d_nan_on_one_rank_every_rank_raises,
    ],
}
WORLD = {"mesh1d": 2, "mesh2d": 4}


@pytest.mark.parametrize("suite,check", [
    pytest.param(suite, check, id=check.__name__.removeprefix("check_"))
    for suite, checks in SUITES.items() for check in checks])
def test_distributed(suite, check):
    _outcome(suite, WORLD[suite], check)


# -- the layout cache across calls (no processes: fake specs) ------------------------------
class _FakePlacement:
    def __init__(self, kind):
        self.kind = kind

    def is_shard(self):
        return self.kind == "shard"

    def is_partial(self):
        return self.kind == "partial"

    def __hash__(self):  # by value, as torch's placements hash
        return hash(self.kind)

    def __eq__(self, other):
        return isinstance(other, _FakePlacement) and other.kind == self.kind


class _FakeMesh:
    def __init__(self):
        self.group_lookups = 0

    def size(self, dim):
        return 2

    def get_group(self, dim):
        self.group_lookups += 1
        return f"group-{dim}"


class _FakeSpec:
    def __init__(self, mesh, *kinds):
        self.mesh, self.placements = mesh, tuple(map(_FakePlacement, kinds))


class _FakeGrad:
    def __init__(self, spec):
        self._spec = spec


def test_layout_cache_serves_a_spec_seen_in_an_earlier_call_by_identity():
    from gradstats.distributed import _LayoutsBySpec

    cache, mesh = _LayoutsBySpec(), _FakeMesh()
    cache.check_world("world")
    grads = [_FakeGrad(_FakeSpec(mesh, "shard", "replicate")) for _ in range(3)]
    first = [cache.get(grad, {}) for grad in grads]  # separate calls: no per-call sharing
    assert first == [(["group-0"], False)] * 3 and mesh.group_lookups == 3
    assert [cache.get(grad, {}) for grad in grads] == first
    assert mesh.group_lookups == 3  # nothing recomputed


def test_layout_cache_never_returns_the_entry_of_a_dead_spec():
    from gradstats.distributed import _LayoutsBySpec

    cache, mesh = _LayoutsBySpec(), _FakeMesh()
    cache.check_world("world")
    dead = _FakeSpec(mesh, "shard")
    cache.get(_FakeGrad(dead), {})
    (entry_id, (ref, layout)), = cache._entries.items()
    new = _FakeSpec(mesh, "partial", "shard")
    del dead
    assert ref() is None
    cache._entries[id(new)] = (ref, layout)  # as if `new` reused the dead spec's id
    assert cache.get(_FakeGrad(new), {}) == (["group-1"], True)


def test_layout_cache_is_emptied_under_a_new_default_group():
    from gradstats.distributed import _LayoutsBySpec

    cache, mesh = _LayoutsBySpec(), _FakeMesh()
    spec = _FakeSpec(mesh, "shard")
    cache.check_world("world")
    cache.get(_FakeGrad(spec), {})
    cache.check_world("world")
    assert cache._entries
    cache.check_world("another world")
    assert not cache._entries
