"""Recompiles from specialization churn: what one call site hands each Triton kernel must
not change with the tensor count, the work-item count or histogram settings that are off.

Triton specializes each pointer argument on whether it is 16-byte aligned, so every slice of
a work list's ``meta`` must be, whatever the tensor and work-item counts are.
"""
import pytest
import torch
from helpers import make_grads

from gradstats import worklist


@pytest.mark.parametrize("n_tensors", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("extra_work", [0, 1])
def test_every_meta_slice_is_16_byte_aligned(small_chunks, n_tensors, extra_work):
    # n tensors of one chunk each, the last one of two when extra_work: W = n + extra_work.
    sizes = [100] * n_tensors
    sizes[-1] += 256 * extra_work
    grads = make_grads(sizes, torch.float32, torch.device("cpu"))
    work = worklist.plan_for(grads, torch.device("cpu")).groups[0]
    assert (work.n_tensors, work.n_work) == (n_tensors, n_tensors + extra_work)
    assert work.meta.data_ptr() % 16 == 0
    parts = {name: getattr(work, name) for name in
             ("ptrs", "numels", "slots", "first_work", "work_tensor", "work_chunk")}
    misaligned = {name: part.data_ptr() % 16 for name, part in parts.items()
                  if part.data_ptr() % 16}
    assert not misaligned
    # The padding moved the parts, not their contents.
    assert parts["ptrs"].tolist() == [g.data_ptr() for g in grads]
    assert parts["numels"].tolist() == sizes
    assert parts["slots"].tolist() == list(range(n_tensors))
    assert parts["first_work"].tolist() == list(range(n_tensors + 1))[:n_tensors] + [
        n_tensors + extra_work]
    assert parts["work_tensor"].tolist() == list(range(n_tensors)) + [n_tensors - 1] * extra_work
    assert parts["work_chunk"].tolist() == [0] * n_tensors + [1] * extra_work
