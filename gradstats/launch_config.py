"""Launch settings per device kind and dtype (chunk, block, warps). Outside ``kernels/``: the
work lists are built from them and the reference sums per chunk, neither importing triton.

``chunk`` is the work unit: one program reads ``chunk`` elements of one tensor, so a tiny
bias and a huge embedding both split into equal pieces. ``block`` is how many elements a
program handles per loop step. Both are powers of two and ``block`` divides ``chunk``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchConfig:
    chunk: int
    block: int
    num_warps: int


# On GPUs: 16K-element chunks kept a many-small-tensors set busy where 64K chunks left
# programs idle (../shared/research/gpu-measurements.md); 2-byte dtypes get twice the
# elements per step so each load moves the same number of bytes.
GPU_CONFIGS = {
    torch.float32: LaunchConfig(chunk=16384, block=4096, num_warps=8),
    torch.float64: LaunchConfig(chunk=16384, block=2048, num_warps=8),
    torch.bfloat16: LaunchConfig(chunk=32768, block=8192, num_warps=8),
    torch.float16: LaunchConfig(chunk=32768, block=8192, num_warps=8),
}

# The interpreter pays per program and per loop step, hardly per element: big blocks.
INTERPRETER_CONFIG = LaunchConfig(chunk=16384, block=4096, num_warps=1)


def launch_config(dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    if device.type == "cpu":
        return INTERPRETER_CONFIG
    return GPU_CONFIGS[dtype]
