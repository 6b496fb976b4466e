"""Which implementation serves a tensor: the one place that decides.

``GRADSTATS_BACKEND`` (read on every call, so tests can switch it):

- ``auto`` (default): Triton kernels for CUDA tensors, the native C++ pass
  (``gradstats._C``) for CPU tensors when it is built, the PyTorch reference elsewhere.
- ``native``: the native C++ pass for CPU tensors; an error when it is not built or for
  other devices.
- ``triton``: Triton for CUDA tensors, and for CPU tensors too when ``TRITON_INTERPRET=1``
  (the Triton interpreter; this is how the kernels are tested without a GPU).
- ``torch``: the PyTorch reference everywhere.

Within the Triton backend, single tensors the kernels cannot read (sparse, complex,
strided with gaps) still take the reference path; see :func:`triton_can_read`.
"""
from __future__ import annotations

import enum
import functools
import os

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false

from . import native

BACKEND_ENV = "GRADSTATS_BACKEND"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Backend(enum.Enum):
    TRITON = "triton"
    TORCH = "torch"
    NATIVE = "native"  # CPU statistics, scale and clamp in C++; finalize uses the reference


# os.environ's mapping methods encode the name and decode the value in Python, ~0.8 us a
# read, and every call reads two variables. On POSIX, CPython keeps the mapping's contents
# in ``os.environ._data`` (bytes to bytes, updated by every change made through
# os.environ), where a read is one dict lookup. Elsewhere, or once os.environ has been
# replaced by another mapping (mock.patch.object(os, "environ", ...)), the public way.
_ENVIRON = os.environ
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _environ_get(name: str, default: str) -> str:
    """``os.environ.get(name, default)`` for an ASCII ``name``, at a dict lookup's cost on
    POSIX."""
    environ = os.environ
    if environ is not _ENVIRON or not isinstance(_ENVIRON_BYTES, dict):
        return environ.get(name, default)
    value = _ENVIRON_BYTES.get(name.encode())
    return default if value is None else os.fsdecode(value)


def interpreter_enabled() -> bool:
    return _environ_get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def requested_backend() -> str:
    return _backend_choice(_environ_get(BACKEND_ENV, "auto"))


@functools.lru_cache(maxsize=8)  # a process sees one value or a few (tests switch it)
def _backend_choice(value: str) -> str:
    choice = value.strip().lower() or "auto"
    if choice not in ("auto", "triton", "torch", "native"):
        raise ValueError(
            f"{BACKEND_ENV} must be 'auto', 'triton', 'torch' or 'native', got {choice!r}")
    return choice


# Device types by device: ``device.type`` makes a new string per read (~0.3 us), and a call
# asks several times.
_DEVICE_TYPES: dict[torch.device, str] = {}


def device_type(device: torch.device) -> str:
    """``device.type``, remembered per device."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


def choose_backend(device: torch.device) -> Backend:
    """The backend that serves the tensors of ``device``."""
    choice = requested_backend()
    if choice == "torch":
        return Backend.TORCH
    if choice == "native":
        return _native_or_error(device)
    kind = device_type(device)
    if kind == "cuda":
        if triton_importable() and not interpreter_enabled():
            return Backend.TRITON
        if choice == "triton":
            raise RuntimeError(
                f"{BACKEND_ENV}=triton was requested for CUDA tensors, but "
                + ("TRITON_INTERPRET=1 is set (the interpreter only reads CPU tensors)"
                   if triton_importable() else "triton is not installed")
            )
        return Backend.TORCH
    if kind == "cpu" and choice == "triton":
        if not (triton_importable() and interpreter_enabled()):
            raise RuntimeError(
                f"{BACKEND_ENV}=triton on CPU tensors needs triton installed and "
                "TRITON_INTERPRET=1 set before triton is first imported"
            )
        return Backend.TRITON
    if choice == "triton":
        raise RuntimeError(f"{BACKEND_ENV}=triton cannot serve {device.type} tensors")
    if kind == "cpu" and native.available():
        return Backend.NATIVE
    return Backend.TORCH


def _native_or_error(device: torch.device) -> Backend:
    if device.type != "cpu":
        raise RuntimeError(f"{BACKEND_ENV}=native serves CPU tensors only, not {device.type}")
    if not native.available():
        raise RuntimeError(f"{BACKEND_ENV}=native was requested, but "
                           f"{native.unavailable_reason()}")
    return Backend.NATIVE


def backend_info() -> dict[str, str]:
    """Which backend serves each device kind under the current ``GRADSTATS_BACKEND``, and
    why, e.g. ``{"cpu": "native C++ (gradstats._C)", "cuda": "Triton kernels"}``."""
    return {kind: _describe(torch.device(kind)) for kind in ("cpu", "cuda")}


def _describe(device: torch.device) -> str:
    try:
        backend = choose_backend(device)
    except RuntimeError as error:
        return f"none ({error})"
    if backend is Backend.NATIVE:
        return "native C++ (gradstats._C)"
    if backend is Backend.TRITON:
        return "Triton interpreter" if device.type == "cpu" else "Triton kernels"
    if requested_backend() == "torch":
        return f"PyTorch reference ({BACKEND_ENV}=torch)"
    if device.type == "cpu":
        return f"PyTorch reference ({native.unavailable_reason()})"
    return ("PyTorch reference (TRITON_INTERPRET=1 is set)" if triton_importable()
            else "PyTorch reference (triton is not installed)")


def triton_can_read(tensor: torch.Tensor) -> bool:
    """True when the kernels can treat ``tensor``'s memory as one flat, dense block.

    Every statistic and both in-place updates are elementwise and order-free, so a
    permuted (transposed, channels-last) tensor is as good as a contiguous one: its
    ``data_ptr()`` is the lowest address and its elements fill ``numel`` slots.
    The address must be a multiple of the element size.
    """
    if tensor.layout is not torch.strided or tensor.dtype not in TRITON_DTYPES:
        return False
    # The kernels step from the first 16-byte boundary in whole elements: memory from
    # outside torch's allocator (frombuffer, DLPack) may start between two elements.
    if tensor.data_ptr() % tensor.element_size():
        return False
    return tensor.is_contiguous() or is_non_overlapping_and_dense_or_false(tensor)
