"""How parameters are read and named: wrapped models, duplicate names."""
import os
import tempfile

import pytest
import torch
from torch import nn

import gradstats
from gradstats.params import named_items, unwrap_model

EXPECTED_NAMES = ["0.weight", "0.bias", "1.weight", "1.bias"]


def _model_with_grads() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model(torch.randn(4, 3)).sum().backward()
    return model


def test_compiled_model_is_named_like_the_model():
    model = _model_with_grads()
    compiled = torch.compile(model)  # lazy: nothing is compiled to read its parameters
    assert [name for name, _ in compiled.named_parameters()][0] == "_orig_mod.0.weight"
    assert unwrap_model(compiled) is model
    assert gradstats.grad_stats(compiled).names == EXPECTED_NAMES


def test_data_parallel_model_is_named_like_the_model():
    model = _model_with_grads()
    wrapped = nn.DataParallel(model)  # on CPU it only wraps
    assert gradstats.grad_stats(wrapped).names == EXPECTED_NAMES
    assert named_items(torch.compile(wrapped))[1] == EXPECTED_NAMES


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_ddp_model_is_named_like_the_model():
    with tempfile.TemporaryDirectory() as folder:
        torch.distributed.init_process_group(
            "gloo", init_method="file://" + os.path.join(folder, "rendezvous"),
            rank=0, world_size=1)
        try:
            model = _model_with_grads()
            wrapped = nn.parallel.DistributedDataParallel(model)
            assert gradstats.grad_stats(wrapped).names == EXPECTED_NAMES
        finally:
            torch.distributed.destroy_process_group()


def test_duplicate_names_are_rejected_before_anything_changes():
    first, second = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    first.grad, second.grad = torch.full((2,), 9.0), torch.full((2,), 9.0)
    pairs = [("w", first), ("b", second), ("w", second)]
    with pytest.raises(ValueError, match="parameter name 'w' appears more than once"):
        gradstats.clip_grad_norm_(pairs, 1.0)
    with pytest.raises(ValueError, match="'w' appears more than once"):
        gradstats.grad_stats(pairs)
    assert first.grad.tolist() == [9.0, 9.0]
