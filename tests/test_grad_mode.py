"""gradstats.grad_mode.no_grad: the public entry points' cheaper torch.no_grad."""
import pytest
import torch

import gradstats
from gradstats.grad_mode import no_grad


@no_grad
def grad_enabled_inside():
    return torch.is_grad_enabled()


@no_grad
def raises():
    raise ValueError("inside")


@pytest.mark.parametrize("outside", [True, False])
def test_no_grad_turns_recording_off_and_restores_the_callers_mode(outside):
    with torch.set_grad_enabled(outside):
        assert grad_enabled_inside() is False
        assert torch.is_grad_enabled() is outside
        with pytest.raises(ValueError, match="inside"):
            raises()
        assert torch.is_grad_enabled() is outside


def test_no_grad_keeps_the_wrapped_functions_name_and_doc():
    assert gradstats.fused_clip_grad_norm_.__name__ == "fused_clip_grad_norm_"
    assert "Clip the gradient norm" in gradstats.fused_clip_grad_norm_.__doc__


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_clipping_gradients_that_require_grad_records_no_history(backend_device):
    # create_graph=True backward leaves gradients that require grad: the in-place scale
    # must not become part of a graph (torch's clip_grad_norm_ runs under no_grad too; on
    # the reference backend torch's own in-place multiply would record it otherwise).
    param = torch.nn.Parameter(torch.tensor([3.0, 4.0], device=backend_device))
    (param ** 3).sum().backward(create_graph=True)
    assert param.grad.requires_grad
    from_backward = param.grad.grad_fn
    total = gradstats.fused_clip_grad_norm_([param], 1.0)
    assert not total.requires_grad
    assert param.grad.grad_fn is from_backward
    torch.testing.assert_close(param.grad.norm().cpu(), torch.tensor(1.0), atol=1e-5, rtol=0)
    param.grad = None  # breaks the parameter <-> gradient cycle create_graph made


def test_no_grad_compiles_with_fullgraph():
    compiled = torch.compile(grad_enabled_inside, fullgraph=True, backend="eager")
    assert compiled() is False
    assert torch.is_grad_enabled()
