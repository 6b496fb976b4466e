"""Bounded caches of device tensors that outlive a call, kept safe for CUDA graphs and streams.

gradstats keeps two kinds of device memory from one call to the next: each plan's work-list
metadata (``worklist``) and element-count tensors (``stats``). Later calls read them on
whatever stream is current then, and a CUDA graph that captures such a call bakes their
addresses in. A plain LRU would be unsafe twice over:

- **Graphs.** When the LRU drops an entry a captured graph reads, the caching allocator
  hands its memory on, and every replay reads (and the scale kernel writes through)
  garbage pointers. So an entry used while its device's current stream is capturing is
  *pinned*: the LRU never frees it; when it falls out, it moves to a store nothing evicts,
  for the life of the process or until :func:`release_captured_plans`. That store grows
  by one entry per captured call on distinct gradients, never per step or replay.
- **Streams.** An entry is filled by a host-to-device copy ordered on the stream current
  when it was built, and may be used on another. The first use on each new stream makes
  that stream wait, on the GPU, for an event recorded right after the copy, and calls
  ``record_stream`` on its tensors, so the allocator cannot reuse their memory before that
  stream's work is done when the LRU later frees them. An event rather than a synchronous
  copy: a synchronous copy would make the host wait for everything already queued on the
  build stream (a whole backward pass) at every cache miss. Inside capture a stream may not
  wait on an event recorded outside it (CUDA rejects that), so a first use there skips the
  wait: the copy was queued before capture began, and ``torch.cuda.graph`` synchronizes
  the device when capture begins (with a bare ``CUDAGraph.capture_begin``, synchronize
  after the warm-up call, as for any graph input made before capture).

Both happen once per (entry, stream); after that, a use costs a capture check, a stream-id
read and a set lookup. CPU entries skip all of it: one stream, no graphs.
"""
from __future__ import annotations

import collections
from collections.abc import Hashable, Iterable, Iterator

import torch

from . import capture


class _CudaStreams:
    """The CUDA calls a :class:`Lifetime` makes, in one place (tests swap in a fake)."""

    @staticmethod
    def current_id(device: torch.device) -> int:
        # The raw handle: a cheap int, where torch.cuda.current_stream builds an object.
        return torch._C._cuda_getCurrentRawStream(_index(device))

    @staticmethod
    def current(device: torch.device):
        return torch.cuda.current_stream(device)

    @staticmethod
    def event_after_copies(device: torch.device):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    @staticmethod
    def record_stream(tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


_CUDA_STREAMS = _CudaStreams()


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def streams_of(device: torch.device):
    """The stream calls for ``device``'s tensors, or None where there are no streams."""
    return _CUDA_STREAMS if device.type == "cuda" else None


class Lifetime:
    """What keeps one cache entry's device tensors valid: the streams that used them (each
    ordered after the copy that filled them, and recorded with the allocator), and whether
    a CUDA graph captured a use (then the cache must never free them)."""

    __slots__ = ("device", "tensors", "pinned", "_streams_api", "_copied", "_streams")

    def __init__(self, device: torch.device, tensors: Iterable[torch.Tensor]):
        """Call right after the copies that filled ``tensors`` were queued."""
        self.device = device
        self.tensors = tuple(tensors)
        self.pinned = False
        self._streams_api = streams_of(device)
        if self._streams_api is not None:
            self._copied = self._streams_api.event_after_copies(device)
            self._streams = {self._streams_api.current_id(device)}

    def use(self) -> None:
        """A call is about to read the tensors on ``device``'s current stream."""
        if self._streams_api is None:
            return
        in_capture = capture.capturing(self.device)
        if in_capture:
            self.pinned = True
        stream_id = self._streams_api.current_id(self.device)
        if stream_id not in self._streams:
            self._first_use_on(stream_id, in_capture)

    def _first_use_on(self, stream_id: int, in_capture: bool) -> None:
        stream = self._streams_api.current(self.device)
        if not in_capture:  # see the module docstring for the capture case
            stream.wait_event(self._copied)
        for tensor in self.tensors:
            self._streams_api.record_stream(tensor, stream)
        self._streams.add(stream_id)


class _Entry:
    __slots__ = ("value", "lifetime")

    def __init__(self, value, lifetime: Lifetime):
        self.value = value
        self.lifetime = lifetime


class DeviceCache:
    """An LRU of ``size`` values that own device tensors, whose entries used during
    CUDA-graph capture are pinned instead of evicted (see the module docstring).

    Reads like a mapping from key to value (``len``, iteration, ``[]``, ``in``), over the
    recent and the pinned entries together.
    """

    def __init__(self, size: int):
        self.size = size
        self._recent: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
        self._pinned: dict[Hashable, _Entry] = {}
        _caches.append(self)

    def get(self, key: Hashable):
        """The value cached under ``key``, or None. A hit counts as a use on the current
        stream (see :meth:`Lifetime.use`) and becomes the most recently used."""
        entry = self._recent.get(key)
        if entry is None:
            entry = self._pinned.get(key)  # only on an LRU miss: a dict lookup more
            if entry is None:
                return None
        # The usual hit is the most recent entry already; moving it would compare keys again.
        elif next(reversed(self._recent.values())) is not entry:
            try:
                self._recent.move_to_end(key)
            except KeyError:  # another thread evicted it meanwhile: still a valid hit
                pass
        entry.lifetime.use()
        return entry.value

    def add(self, key: Hashable, value, device: torch.device,
            tensors: Iterable[torch.Tensor]):
        """Cache ``value``, whose device memory is ``tensors`` on ``device``, just built on
        the current stream (never during capture: callers refuse that first). Returns it."""
        self._recent[key] = _Entry(value, Lifetime(device, tensors))
        while len(self._recent) > self.size:
            old_key, old = self._recent.popitem(last=False)
            if old.lifetime.pinned:  # a graph reads it: keep it, outside the LRU's bound
                self._pinned[old_key] = old
        return value

    def release_pinned(self) -> int:
        """Drop the pinned entries that fell out of the LRU, and unpin the others (they
        become ordinary LRU entries). Returns how many entries were unpinned or dropped."""
        released = len(self._pinned)
        self._pinned.clear()
        for entry in self._recent.values():
            released += entry.lifetime.pinned
            entry.lifetime.pinned = False
        return released

    def clear(self) -> None:
        self._recent.clear()
        self._pinned.clear()

    def __len__(self) -> int:
        return len(self._recent) + len(self._pinned)

    def __iter__(self) -> Iterator[Hashable]:
        yield from self._recent
        yield from self._pinned

    def __contains__(self, key) -> bool:
        return key in self._recent or key in self._pinned

    def __getitem__(self, key: Hashable):
        entry = self._recent.get(key) or self._pinned[key]
        return entry.value


# Every DeviceCache, for release_captured_plans: two, made at import.
_caches: list[DeviceCache] = []


def release_captured_plans() -> int:
    """Let go of the cached plans and element-count tensors kept for captured CUDA graphs.

    gradstats never frees device memory that a CUDA graph captured reading (see
    :mod:`gradstats.device_cache`); that memory grows by one plan per captured call on
    distinct gradients. Call this after deleting the graphs that captured gradstats calls,
    once their replays have finished (``torch.cuda.synchronize()``): the memory goes back
    to the caching allocator, so replaying such a graph afterwards would read freed memory.
    Entries also in the ordinary cache stay cached, as ordinary entries.

    Returns:
        int: how many entries were released.

    Example::

        >>> del graph
        >>> torch.cuda.synchronize()
        >>> gradstats.release_captured_plans()
    """
    return sum(cache.release_pinned() for cache in _caches)
