"""The host path of every call: parameters -> gradients -> route, in one walk.

With the native layer built (``csrc/host_path.cpp``), one C++ walk over the parameters
collects their gradients and reads what routing needs (devices, dtypes, contiguity, the
exact plan key): a few ns per tensor, where Python pays 50-100 ns per attribute read, and
at 4,500 gradients those reads were most of a call's host time. Without it (or for input
the walk cannot describe: tensor subclasses, a torch function mode, unusual layouts, and
under ``torch.compile``) the Python path runs: ``params.gradients`` then ``ops.route``.
Both give the same gradients, names and route.
"""
from __future__ import annotations

import torch

from . import dispatch, distributed, native, ops, worklist
from .params import gradients


def gradients_and_route(
    params: list[torch.Tensor], names: list[str] | None, statistics: bool = False,
) -> tuple[list[torch.Tensor], list[str] | None, dispatch.Route | None]:
    """The non-``None`` gradients of ``params``, the names of their parameters, and their
    route (None when there is no gradient, for ``DTensor`` gradients, or under
    ``torch.compile``). ``statistics``: the caller runs the statistics pass on them next;
    the walk then lists CPU gradients for the native CPU pass (``Route.cpu_listing``)."""
    if not torch.compiler.is_compiling():
        # The walk lists CPU gradients only (at the first other one it stops), and only
        # the native backend reads the listing: asking the backend here would cost every
        # call (CUDA ones too) an environment read.
        facts = native.host_pass(params, True, statistics)
        if facts is not None:
            grads, kept = facts.tensors, facts.kept
            if names is not None:
                names = list(names) if kept is None else [names[i] for i in kept]
            return grads, names, dispatch.route(grads, facts) if grads else None
    grads, names = gradients(params, names)
    # DTensor gradients are routed as their local shards, once the caller has them.
    routable = grads and not distributed.any_dtensor(grads)
    return grads, names, ops.route(grads) if routable else None


def local_gradients_and_route(
    params: list[torch.Tensor], names: list[str] | None, process_group=None, **view_options,
) -> tuple[list[torch.Tensor], list[str] | None, dispatch.Route | None,
           distributed.ShardedLayout | None]:
    """:func:`gradients_and_route`, with sharded gradients (``DTensor``, or plain ones
    under ``process_group``) replaced by the local tensors the fused pass reads, routed as
    such, and the layout that combines their partials (None when nothing is sharded).
    ``view_options``: :func:`distributed.local_view`'s (``statistics=False``: the caller
    only scales, see there)."""
    statistics = view_options.get("statistics", True)
    grads, names, route = gradients_and_route(params, names, statistics)
    if not grads or (route is not None and process_group is None):
        # A route is only ever made for plain tensors (no DTensor), so nothing is sharded:
        # local_view's check of every gradient's type is spared (~25 us at 4,500).
        return grads, names, route, None
    sharding = distributed.local_view(grads, process_group, **view_options)
    if sharding is not None:
        grads = sharding.tensors
        route = route or ops.route(grads)  # DTensor gradients: routed as their local shards
    return grads, names, route, sharding


def plan_key(tensors: list[torch.Tensor]) -> worklist.PlanKey:
    """The key the plan of non-empty ``tensors`` (one device) is cached under, on the host
    path in force (for tests and tools that look a plan up without building one)."""
    facts = native.host_pass(tensors, False)
    if facts is None:
        return worklist.plan_key(tensors, tensors[0].device)
    return dispatch.native_plan_key(facts)
