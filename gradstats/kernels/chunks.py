"""How a program finds and reads its work item, shared by the statistics and update kernels.

A work item is one chunk of one tensor. Its elements are read in four parts so that
everything that can be read with 128-bit loads is, whatever the tensor's address:

    [ head | full blocks ... | tail: whole 16-byte vectors | remainder ]
      ^ chunk               ^ body: the first 16-byte boundary at or after the chunk

- head: the < 16 bytes before the first 16-byte boundary; only a tensor that does not start
  on one (a view at an odd offset into a flat buffer or a DDP bucket) has them. Scalar loads.
- full blocks: BLOCK elements each, unmasked, from a base the compiler knows is 16-byte
  aligned: 128-bit loads.
- tail: the whole vectors after the full blocks. Its mask ends on a vector boundary, which
  the compiler can prove (the bound is a multiple of VEC), so it keeps 128-bit (predicated)
  loads.
- remainder: the < 16 bytes after the last whole vector. Scalar loads. The statistics
  kernel reads it with the head in one gathered access (``_edges``): merged into the
  tail's values instead, it kept 40 to 70 more registers live, and a separate access would
  inline the per-element statistics (histogram included) once more.

Alignment is decided per work item from the tensor's address, on the device, so one
unaligned gradient costs only its own head; the rest of its group keeps wide loads and the
kernels need no alignment switch (one compiled kernel whatever the addresses).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The widest load a thread issues (ld.global.v4.b32).
VECTOR_BYTES = 16


def vector_width(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in one 128-bit load."""
    return VECTOR_BYTES // dtype.itemsize


def launch_vector_width(dtype: torch.dtype, chunk: int, block: int) -> int:
    """The kernels' ``VEC`` for ``dtype``, once the launch sizes are checked against what
    the kernels rely on: chunks a whole number of blocks, so every chunk of a tensor is as
    far from a 16-byte boundary as its first element, and blocks of at least two vectors
    (the head and the remainder share one block)."""
    width = vector_width(dtype)
    if chunk % block or block % (2 * width):
        raise ValueError(f"gradstats: chunk {chunk} and block {block} must be multiples of "
                         f"block and of {2 * width} {dtype} elements respectively")
    return width


@triton.jit
def _work_item(ptrs_ptr, numels_ptr, work_tensor_ptr, work_chunk_ptr,
               DTYPE: tl.constexpr, CHUNK: tl.constexpr, VEC: tl.constexpr):
    """This program's work item: (tensor index, chunk, body, chunk length, head), where
    ``chunk`` points to the chunk's first element, ``head`` is how many elements precede
    its first 16-byte boundary and ``body = chunk + head`` points to that boundary."""
    work = tl.program_id(0)
    tensor = tl.load(work_tensor_ptr + work)
    address = tl.load(ptrs_ptr + tensor)
    # int64 offsets: tensors may exceed 2^31 elements.
    start = tl.load(work_chunk_ptr + work) * CHUNK
    length = tl.minimum(tl.load(numels_ptr + tensor) - start, CHUNK)
    # Chunks start CHUNK elements apart, a whole number of vectors, so every chunk of a
    # tensor lies as far from a 16-byte boundary as the tensor's first element.
    head_bytes = (-address) & 15
    head = tl.minimum(head_bytes // (16 // VEC), length)
    chunk = address.to(tl.pointer_type(DTYPE)) + start
    # The hint sits on the integer-to-pointer conversion: one on ``chunk + head`` would
    # be lost when the compiler folds that addition into later ones.
    body = tl.multiple_of((address + head_bytes).to(tl.pointer_type(DTYPE)), 16) + start
    return tensor, chunk, body, length, head


@triton.jit
def _vector_end(length, VEC: tl.constexpr):
    """``length`` rounded down to whole vectors: a bound provably a multiple of VEC, so a
    mask ``offsets < bound`` is constant over each vector and loads under it stay wide."""
    return tl.multiple_of((length // VEC) * VEC, VEC)


@triton.jit
def _edges(lanes, head, vector_end, length, VEC: tl.constexpr):
    """(offsets from the chunk's start, mask) of the elements no 128-bit load covers: the
    ``head`` before the first 16-byte boundary on lanes ``[0, VEC)``, and the remainder
    after the last whole vector (``head + vector_end .. length``) on lanes ``[VEC, 2 VEC)``.
    Both are shorter than a vector, so one masked (scalar) access reads them all."""
    in_head = lanes < VEC
    offsets = tl.where(in_head, lanes, head + vector_end - VEC + lanes)
    return offsets, tl.where(in_head, lanes < head, offsets < length)
