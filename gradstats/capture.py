"""CUDA-graph capture: telling when it is on, and refusing work that must not start inside it.

A captured graph replays the kernels it recorded with the addresses and compiled code they
had at capture time; nothing gradstats does in Python runs again. So whatever a call does
for the first time (build a plan and copy it to the device, copy an element-count tensor,
compile and load a Triton kernel) must happen before capture: copies from host memory that
is freed afterwards, and module loads, do not belong in a graph (a load may even invalidate
the capture). Each such step asks :func:`capturing` and raises :func:`capture_error` rather
than doing the work. The remedy is always the same: run the same call once before
capturing, with the same gradients (which is also what ``torch.cuda.graphs`` recommends
for any captured code: warm-up iterations on a side stream).

Triton launches are tracked here too: :func:`note_launch` keeps the signature of every
kernel specialization launched outside capture (kernel, device, dtype, launch config,
constexpr-selecting options), and a signature first seen during capture is refused.
The set grows by one per specialization Triton compiles, which it caches anyway.
"""
from __future__ import annotations

import torch

RUN_ONCE_FIRST = (
    "Run the same call once before capturing, with the same gradients, and keep their "
    "storage between steps (optimizer.zero_grad(set_to_none=False))."
)

# Signatures of the kernel specializations launched so far (see ``note_launch``).
_launched: set[tuple] = set()


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (False off CUDA).

    Asked about the gradients' device, not the current one: the launches run under that
    device's guard, on its current stream.
    """
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()  # no guard needed: the usual case
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def capture_error(cause: str, remedy: str = RUN_ONCE_FIRST) -> RuntimeError:
    """The error for work gradstats refuses to start inside CUDA-graph capture."""
    return RuntimeError(f"gradstats: {cause} during CUDA-graph capture. {remedy}")


def note_launch(signature: tuple, device: torch.device) -> None:
    """Record a Triton launch about to happen; refuse it in capture if it is the first.

    ``signature`` names the compiled kernel the launch needs: the kernel, the device, and
    every option that selects constexprs, pointer dtypes or ``num_warps``. Pointer
    alignment needs no entry: every pointer argument is 16-byte aligned by construction
    (fresh allocations, and meta parts padded to 16 bytes), so Triton's divisibility
    specialization is the same for every launch. Called before the launch: one set lookup
    when the signature is known, as it is on every call after the first.
    """
    if signature in _launched:
        return
    if capturing(device):
        raise capture_error(
            f"the first launch of a Triton kernel specialization {signature!r} (it would "
            "compile and load a kernel)")
    _launched.add(signature)
