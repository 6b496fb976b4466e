"""The CPU pass's listing made by the native host walk (csrc/cpu_listing.h): the same bits
as the direct call, made only when every tensor is one the pass reads, serving only the
unchanged list the walk returned, outside modes only, and holding the storages it reads."""
from __future__ import annotations

import gc
import math
import random
import sys

import pytest
import torch
from helpers import RecordingMode, with_grads
from torch.overrides import TorchFunctionMode

import gradstats
from gradstats import backend, dispatch, host_path, native
from gradstats.backend import Backend
from gradstats.norms import norm_kind

pytestmark = pytest.mark.skipif(not native.host_path_available(),
                                reason=f"{native.unavailable_reason()}")

CHUNK = native.NATIVE_CHUNK
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def mixed_grads(dtype):
    torch.manual_seed(0)
    grads = [torch.randn(n).to(dtype) for n in (0, 1, 17, 1000, CHUNK, 2 * CHUNK + 3)]
    grads.append(torch.randn(40, 30).to(dtype).t())  # permuted-dense: listed as it is read
    grads.append(torch.tensor([0.0, math.nan, -math.inf, 1e-30]).to(dtype))
    return grads


def listed_stats(facts, p=2.0, num_bins=16, min_exp=-20):
    return native.cpu_stats_listed(facts.cpu_listing, facts.tensors, p, norm_kind(p),
                                   num_bins, min_exp)


def direct_stats(tensors, p=2.0, num_bins=16, min_exp=-20):
    return native.cpu_stats_direct(tensors, p, norm_kind(p), num_bins, min_exp)


def assert_same_bits(ours, theirs):
    for mine, other in zip(ours, theirs, strict=True):
        assert mine.dtype == other.dtype and mine.shape == other.shape
        assert torch.equal(mine.view(torch.int64) if mine.is_floating_point() else mine,
                           other.view(torch.int64) if other.is_floating_point() else other)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("num_bins", [0, 16])
def test_the_listed_pass_gives_the_direct_calls_bits(dtype, p, num_bins):
    params = with_grads(mixed_grads(dtype))
    facts = native.host_pass(params, True, True)
    assert facts.cpu_listing is not None
    assert_same_bits(listed_stats(facts, p, num_bins), direct_stats(facts.tensors, p, num_bins))
    numel = native.numel_tensor(facts.tensors, facts.cpu_listing)
    assert numel.tolist() == [g.numel() for g in facts.tensors]


def test_the_listing_of_thousands_of_gradients_and_of_plain_tensors():
    torch.manual_seed(1)
    grads = [torch.randn(n) for n in [256, 4096, 3] * 700]
    params = with_grads(grads)
    params.insert(5, torch.nn.Parameter(torch.randn(3)))  # no gradient: not listed
    facts = native.host_pass(params, True, True)
    assert facts.kept is not None and len(facts.tensors) == len(grads)
    assert_same_bits(listed_stats(facts, num_bins=64, min_exp=-40),
                     direct_stats(grads, num_bins=64, min_exp=-40))
    tensors = native.host_pass(grads, False, True)  # a list of tensors is listed as well
    assert_same_bits(listed_stats(tensors), direct_stats(grads))


def test_no_listing_unless_asked_or_when_the_list_is_empty():
    params = with_grads([torch.randn(4)])
    assert native.host_pass(params, True).cpu_listing is None
    assert native.host_pass(params, True, False).cpu_listing is None
    assert native.host_pass([torch.nn.Parameter(torch.randn(2))], True, True).cpu_listing is None


@pytest.mark.parametrize("odd_one", [
    "gaps", "complex", "int", "sparse", "negative view", "conjugate view", "zero tensor",
    "meta",
])
def test_no_listing_when_the_pass_cannot_read_one_tensor(odd_one):
    other = {
        "gaps": lambda: torch.randn(10)[::2],
        "complex": lambda: torch.randn(4, dtype=torch.complex64),
        "int": lambda: torch.arange(4),
        "sparse": lambda: torch.randn(4).to_sparse(),
        "negative view": lambda: torch._neg_view(torch.randn(4)),
        "conjugate view": lambda: torch.randn(4, dtype=torch.complex64).conj(),
        "zero tensor": lambda: torch._efficientzerotensor(4),
        "meta": lambda: torch.empty(4, device="meta"),
    }[odd_one]()
    for tensors in ([torch.randn(3), other], [other, torch.randn(3), torch.randn(2, 2).t()]):
        facts = native.host_pass(tensors, False, True)
        assert facts is None or facts.cpu_listing is None
        # The walk goes on without the listing from the tensor that ended it: the same facts
        # as a walk never asked for one.
        unasked = native.host_pass(tensors, False)
        assert (facts is None) == (unasked is None)
        if facts is not None:
            assert list(map(id, facts.tensors)) == list(map(id, unasked.tensors))
            assert facts[1:7] == unasked[1:7]


# Kinds of tensor for the randomised walks below: (make, whether the CPU pass reads it,
# whether it can be a parameter's gradient).
_SHARED = torch.randn(64)
_WALK_KINDS = [
    (lambda: torch.randn(5), True, True),
    (lambda: torch.randn(0, 3), True, True),
    (lambda: torch.randn(4, dtype=torch.bfloat16), True, True),
    (lambda: torch.randn(2, 3, dtype=torch.float64), True, True),
    (lambda: torch.randn(3, 4).t(), True, True),  # permuted-dense
    # Views of one storage at one address (the key's trailer), contiguous and permuted.
    (lambda: _SHARED[:16], True, True),
    (lambda: _SHARED.view(8, 8).t(), True, True),
    (lambda: torch.empty(3, device="meta"), False, True),  # as a CUDA gradient: not CPU
    (lambda: torch.randn(4, 4).to_sparse(), False, True),
    (lambda: torch.randn(3, dtype=torch.complex64), False, True),
    (lambda: torch.randn(10)[::2], False, True),
    (lambda: torch._neg_view(torch.randn(4)), False, True),
    (lambda: torch.arange(5), False, False),
]


@pytest.mark.parametrize("take_grad", [False, True])
def test_a_walk_asked_to_list_returns_what_an_unasked_walk_returns(take_grad):
    # A walk asked for the listing goes on without it from the tensor that ends it
    # (csrc/host_path.cpp, walk_items): whatever the mix, every field but the listing,
    # key bytes and hash included, is that of a walk never asked, and the listing is made
    # exactly when the pass reads every tensor.
    rng = random.Random(11 if take_grad else 12)
    kinds = [kind for kind in _WALK_KINDS if kind[2] or not take_grad]
    for _ in range(300):
        chosen = [rng.choice(kinds) for _ in range(rng.randrange(1, 9))]
        tensors = [make() for make, _, _ in chosen]
        readable = [reads for _, reads, _ in chosen]
        items = with_grads(tensors) if take_grad else tensors
        if rng.random() < 0.3:  # an item listed twice
            j = rng.randrange(len(items))
            items.append(items[j])
            readable.append(readable[j])
        for _ in range(rng.randrange(3) if take_grad else 0):  # parameters without a gradient
            items.insert(rng.randrange(len(items) + 1), torch.nn.Parameter(torch.ones(2)))
        asked = native.host_pass(items, take_grad, True)
        unasked = native.host_pass(items, take_grad)
        assert list(map(id, asked.tensors)) == list(map(id, unasked.tensors))
        assert asked[1:7] == unasked[1:7] and unasked.cpu_listing is None
        assert (asked.cpu_listing is not None) == all(readable)
        if asked.cpu_listing is not None:
            assert_same_bits(listed_stats(asked), direct_stats(asked.tensors))


def test_the_listing_serves_only_the_unchanged_list_it_was_made_from():
    grads = [torch.randn(5), torch.randn(7)]
    facts = native.host_pass(with_grads(grads), True, True)
    assert listed_stats(facts) is not None
    assert native.cpu_stats_listed(facts.cpu_listing, list(facts.tensors), 2.0, 2, 0, 0) is None
    assert native.cpu_stats_listed(object(), facts.tensors, 2.0, 2, 0, 0) is None
    facts.tensors[1] = torch.randn(7)  # the same length, another tensor
    assert listed_stats(facts) is None
    assert native.numel_tensor(facts.tensors, facts.cpu_listing).tolist() == [5, 7]  # read anew
    facts.tensors[1] = grads[1]
    assert listed_stats(facts) is not None
    facts.tensors.append(torch.randn(2))
    assert listed_stats(facts) is None


def test_the_listing_steps_aside_under_modes_entered_after_the_walk():
    facts = native.host_pass(with_grads([torch.randn(5)]), True, True)
    with RecordingMode():
        assert listed_stats(facts) is None
    with TorchFunctionMode():
        assert listed_stats(facts) is None
    assert listed_stats(facts) is not None


def storage_uses(tensor):
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def test_the_listing_holds_the_storages_it_reads_until_it_is_dropped():
    # Between the walk and the pass the gradients may get new memory (set_, or .data =),
    # their old storage then held by the listing alone: the pass reads the data as it was
    # walked, from memory still allocated, and dropping the listing frees it.
    torch.manual_seed(2)
    grad = torch.randn(1000)
    params = with_grads([grad])
    walked = grad.clone()
    uses = storage_uses(grad)
    facts = native.host_pass(params, True, True)
    assert storage_uses(grad) == uses + 1
    old_storage = grad.untyped_storage()
    grad.set_(torch.full((1000,), 7.0))  # the gradient's memory replaced
    assert torch._C._storage_Use_Count(old_storage._cdata) == 2  # ours, and the listing's
    assert_same_bits(listed_stats(facts), direct_stats([walked]))
    del facts
    gc.collect()
    assert torch._C._storage_Use_Count(old_storage._cdata) == 1


def test_listing_calls_leave_reference_counts_as_they_were():
    params = with_grads([torch.randn(4), torch.randn(3, 3).t()])
    before = [(sys.getrefcount(p.grad), storage_uses(p.grad)) for p in params]
    for _ in range(3):
        facts = native.host_pass(params, True, True)
        assert listed_stats(facts) is not None
        assert native.numel_tensor(facts.tensors, facts.cpu_listing) is not None
        del facts
    assert [(sys.getrefcount(p.grad), storage_uses(p.grad)) for p in params] == before


def test_a_walk_that_gives_the_listing_up_holds_no_storage():
    grad = torch.randn(6)
    uses = storage_uses(grad)
    facts = native.host_pass([grad, torch.randn(10)[::2]], False, True)
    assert facts.cpu_listing is None and storage_uses(grad) == uses


def test_grad_stats_and_clipping_run_the_listed_pass(monkeypatch):
    # The statistics pass is planned from the walk's listing: the direct call that lists
    # the tensors again is not called, and the results are the reference's.
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    torch.manual_seed(4)
    params = with_grads([torch.randn(n) for n in (3, 300, 2 * CHUNK + 1)])
    _, _, route = host_path.gradients_and_route(params, None, statistics=True)
    assert route.cpu_listing is not None
    _, _, route = host_path.gradients_and_route(params, None)
    assert route.cpu_listing is None

    def refused(*args):
        raise AssertionError("the listing was not used")

    monkeypatch.setenv("GRADSTATS_BACKEND", "torch")
    reference = gradstats.grad_stats(params)
    monkeypatch.setenv("GRADSTATS_BACKEND", "native")
    monkeypatch.setattr(native._extension(), "cpu_stats_list", refused)
    monkeypatch.setattr(native._extension(), "numel_list", refused)
    stats = gradstats.grad_stats(params)
    torch.testing.assert_close(stats.norms, reference.norms)
    assert torch.equal(stats.hist, reference.hist) and torch.equal(stats.numel, reference.numel)
    theirs = with_grads([p.grad.clone() for p in params])
    total = gradstats.fused_clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    for mine, other in zip(params, theirs):
        torch.testing.assert_close(mine.grad, other.grad)


def test_the_listing_steps_aside_when_a_held_storage_gets_a_new_buffer():
    # A tensor's resize_ past its storage's size reallocates that same storage's buffer
    # and frees the old one, which the listing points into (a finaliser running during or
    # after the walk can do it): the listing then serves no pass, whose statistics are
    # those of the tensor as it is now, not of freed memory. (The counts, which read no
    # tensor memory, stay those walked: as before, counts and pass read the tensors at two
    # moments, and a tensor resized in between shows both.)
    grad = torch.ones(1000)
    params = with_grads([grad])
    facts = native.host_pass(params, True, True)
    storage = grad.untyped_storage()
    grad.resize_(4 * CHUNK)
    assert grad.untyped_storage()._cdata == storage._cdata  # the storage held, reallocated
    grad.fill_(2.0)
    assert listed_stats(facts) is None
    assert native.numel_tensor(facts.tensors, facts.cpu_listing).tolist() == [1000]
    route = dispatch.Route(torch.device("cpu"), Backend.NATIVE, None,
                           frozenset({torch.float32}), True, facts.cpu_listing)
    power, nonfinite, _ = dispatch.accumulate_stats(facts.tensors, 2.0, 0, 0, route)
    assert power.tolist() == [grad.double().square().sum().item()] == [16.0 * CHUNK]
    assert nonfinite.tolist() == [0]


def test_a_setting_that_serves_no_cpu_tensor_does_not_stop_other_devices(monkeypatch):
    # GRADSTATS_BACKEND=triton without the interpreter serves CUDA tensors only: asking
    # the walk for a listing must not raise the CPU tensors' error for them (it asks no
    # backend: the walk lists CPU gradients only). (No CUDA here: the route is stubbed.)
    monkeypatch.setenv("GRADSTATS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.choose_backend(torch.device("cpu"))
    asked = []
    host_pass = native.host_pass
    monkeypatch.setattr(native, "host_pass", lambda items, take_grad, listing=False:
                        asked.append(listing) or host_pass(items, take_grad, listing))
    monkeypatch.setattr(dispatch, "route", lambda grads, facts: "routed")
    params = with_grads([torch.randn(3)])
    grads, _, route = host_path.gradients_and_route(params, None, statistics=True)
    assert asked == [True] and route == "routed" and grads[0] is params[0].grad
