"""Realistic gradient sets: the parameter shapes of real models, not one big tensor."""
from __future__ import annotations

import torch


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """transformers' GPT2LMHeadModel (tied head): 148 tensors, 124.4M elements."""
    d, ff, vocab, ctx, layers = 768, 3072, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


def decoder_1b_shapes() -> list[tuple[int, ...]]:
    """A ~1B-parameter decoder without biases: d=2048, 18 layers, ff=8192, vocab 50257."""
    d, ff, vocab, layers = 2048, 8192, 50257, 18
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, 3 * d), (d, d), (d,), (d, ff), (ff, d)]
    return shapes + [(d,)]


def resnet50_like_shapes() -> list[tuple[int, ...]]:
    """Conv weights and BatchNorm affine pairs of a ResNet-50: 161 tensors, 25.6M elements."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = width * 4
        for block in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    return shapes + [(1000, 2048), (1000,)]


def many_small_shapes() -> list[tuple[int, ...]]:
    """4,500 bias/LayerNorm-sized tensors, where launches and host overhead dominate."""
    return [(256,)] * 4000 + [(64, 64)] * 500


WORKLOADS = {
    "gpt2-small": gpt2_small_shapes,
    "decoder-1b": decoder_1b_shapes,
    "resnet50": resnet50_like_shapes,
    "many-small": many_small_shapes,
}


def make_params(shapes, dtype, device, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters with normal gradients (std 1e-3, typical of late training)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        param.grad = torch.randn(shape, dtype=dtype, device=device, generator=generator) * 1e-3
        params.append(param)
    return params
