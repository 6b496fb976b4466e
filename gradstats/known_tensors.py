"""Plan keys for lists of tensors seen before, recognised without reading every attribute.

Used by the Python host path only: with ``gradstats._C`` built, the native walk
(csrc/host_path.cpp) builds the full key of every list in a few ns per tensor, for new and
old gradient objects alike, and nothing is remembered here.

A training loop hands the same gradient tensors to every step (``zero_grad(set_to_none=
False)``, or gradients kept between steps). The plan key (``worklist.plan_key``) reads five
attributes of every tensor, and at 4,500 tensors each read costs 0.2-0.35 ms of host time.
Recognising a list seen before reads three per tensor: ``id()``, ``data_ptr()`` and
``numel()``.

Why that is enough:

- ``id()`` names one object only while it lives. Every tensor of a remembered list carries
  a weak reference whose callback forgets the list the moment any of them dies, so while a
  list is remembered, equal ids are the very same tensor objects. (A gradient freed and
  reallocated at the same address, with another shape or dtype, is a new object: the old
  one died first, and its list was forgotten.)
- The same object can still be given other memory: ``.data =`` (``module.to()``,
  ``half()``), ``set_``, a ``resize_``. Addresses and element counts are compared, and such
  a change misses. What the key also holds (dtype, device, dense layout) cannot change
  while object, address and element count stay, except by re-pointing a tensor at a
  reinterpreting view of its own memory (``t.data = t.view(other dtype)``, ``as_strided_``),
  which no training code does to gradients.

Only lists whose key says every tensor is dense and contiguous are remembered (a sparse
tensor has no ``data_ptr``; strided ones are rare and keep the full key).

Arming a list (a weak reference per tensor, about as costly as one key pass) only pays off
when its tensors live on. With ``zero_grad(set_to_none=True)`` every step brings new
gradient objects, so a list that dies before it was ever recognised counts as wasted, and
after ``WASTED_ARMINGS_BEFORE_BACKOFF`` of those in a row only every
``REARM_INTERVAL``-th chance arms, until one is recognised again.
"""
from __future__ import annotations

import collections
import itertools
import threading
import weakref

import torch

from .worklist import PlanKey

# Lists remembered at once: a training job passes one or two (the monitor's and a clip's
# list of the same tensors share one entry).
KNOWN_LISTS = 8
WASTED_ARMINGS_BEFORE_BACKOFF = 2
REARM_INTERVAL = 32


class _KnownList:
    """One remembered list: its key, the addresses and sizes it was seen with, and the
    weak references whose death forgets it."""

    __slots__ = ("ids", "device", "key", "addresses", "numels", "refs", "recognised")

    def __init__(self, ids, device, key, addresses, numels):
        self.ids, self.device, self.key = ids, device, key
        self.addresses, self.numels = addresses, numels
        self.refs: list | None = None
        self.recognised = False

    def forget(self, _ref=None) -> None:
        """The callback of every weak reference: the first tensor to die forgets the list.
        Dropping the other references means their callbacks never run, and breaks the
        cycle entry -> references -> callback -> entry."""
        if self.refs is None:
            return
        self.refs = None
        _known.forget(self)


class _KnownLists:
    def __init__(self):
        self._lists: collections.OrderedDict[tuple, _KnownList] = collections.OrderedDict()
        # Re-entrant: a weak-reference callback may run inside a locked block (a garbage
        # collection triggered there), and callbacks run on whichever thread drops a tensor.
        self._lock = threading.RLock()
        self._wasted = 0  # remembered lists forgotten unrecognised, in a row
        self._chances = 0

    def key_of(self, tensors: list[torch.Tensor], device: torch.device) -> PlanKey | None:
        if not self._lists:  # nothing remembered (backed off): not even the ids are read
            return None
        ids = tuple(map(id, tensors))
        known = self._lists.get(ids)
        if known is None or known.device != device:
            return None
        # The same objects; their memory may still have moved (see the module docstring).
        if (tuple(map(torch.Tensor.data_ptr, tensors)) != known.addresses
                or tuple(map(torch.Tensor.numel, tensors)) != known.numels):
            return None
        if not known.recognised:
            known.recognised = True
            self._wasted = 0
        return known.key

    def remember(self, tensors: list[torch.Tensor], device: torch.device, key: PlanKey) -> None:
        if not key.all_contiguous or not self._arming_pays():
            return
        known = _KnownList(tuple(map(id, tensors)), device, key,
                           tuple(map(torch.Tensor.data_ptr, tensors)),
                           tuple(map(torch.Tensor.numel, tensors)))
        try:
            known.refs = list(map(weakref.ref, tensors, itertools.repeat(known.forget)))
        except TypeError:  # a tensor subclass without weak references: not remembered
            return
        with self._lock:
            previous = self._lists.pop(known.ids, None)
            self._lists[known.ids] = known
            evicted = [] if len(self._lists) <= KNOWN_LISTS else [self._lists.popitem(False)[1]]
        for old in ([previous] if previous is not None else []) + evicted:
            old.refs = None  # not forget(): these were replaced, not found dead

    def _arming_pays(self) -> bool:
        if self._wasted < WASTED_ARMINGS_BEFORE_BACKOFF:
            return True
        self._chances += 1
        return self._chances % REARM_INTERVAL == 0

    def forget(self, known: _KnownList) -> None:
        with self._lock:
            if self._lists.get(known.ids) is known:
                del self._lists[known.ids]
            if not known.recognised:
                self._wasted += 1

    def clear(self) -> None:
        with self._lock:
            lists = list(self._lists.values())
            self._lists.clear()
            self._wasted = self._chances = 0
        for known in lists:
            known.refs = None


_known = _KnownLists()
remembered_key = _known.key_of
remember = _known.remember
forget_all = _known.clear
