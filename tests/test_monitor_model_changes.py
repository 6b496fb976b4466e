"""GradMonitor follows the model: layers added, replaced, deleted or wrapped after it was made
are logged and clipped, and the old parameters are let go."""
import gc
import weakref

import pytest
import torch
from monitor_helpers import ListSink

import gradstats


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))


def add_head(model):
    model.append(torch.nn.Linear(4, 2))


def replace_first(model):
    model[0] = torch.nn.Linear(4, 4)


def delete_last(model):
    del model[2]


def delete_attribute(model):
    delattr(model, "2")  # `del model.head`, for a Sequential


def wrap_in_adapter(model):
    class Adapter(torch.nn.Module):  # LoRA-style: the base layer plus a new low-rank pair
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.lora_A = torch.nn.Linear(4, 2, bias=False)
            self.lora_B = torch.nn.Linear(2, 4, bias=False)

        def forward(self, x):
            return self.base_layer(x) + self.lora_B(self.lora_A(x))

    model[0] = Adapter(model[0])


def set_bias_to_none(model):
    model[0].bias = None


def convert_with_new_parameters(model):
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64).to(torch.float32)  # new Parameter objects, as before 2.0
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)


CHANGES = {"add": add_head, "replace": replace_first, "delete-item": delete_last,
           "delete-attribute": delete_attribute, "wrap": wrap_in_adapter,
           "param-to-none": set_bias_to_none, "to-new-parameters": convert_with_new_parameters}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_changed_model_is_logged_and_clipped_as_it_is_now(change):
    model = make_model()
    sink = ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[sink])
    model(torch.randn(3, 4)).sum().backward()
    monitor.step()  # the first tree; its gradients stay, as without zero_grad()
    first_params = [weakref.ref(p) for p in model.parameters()]
    change(model)
    (model(torch.randn(3, 4)).square().sum() * 100).backward()
    total = monitor.step(max_norm=1.0)
    assert list(sink.records[-1].norms) == [name for name, _ in model.named_parameters()]
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert expected.item() == pytest.approx(1.0, rel=1e-4)  # exactly these were clipped
    assert total.item() > 1.0
    gc.collect()
    kept = {id(p) for p in model.parameters()}
    alive = [ref() for ref in first_params if ref() is not None]
    assert [p for p in alive if id(p) not in kept] == []  # the monitor let the old ones go
    monitor.close()


def test_an_unchanged_model_is_not_walked_again(monkeypatch):
    from gradstats import watched_params

    model = make_model()
    monitor = gradstats.GradMonitor(model, sinks=[])
    walks = []
    real = watched_params.named_items
    monkeypatch.setattr(watched_params, "named_items", lambda m: walks.append(1) or real(m))
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
        monitor.step()
    assert walks == []
    add_head(model)
    model(torch.randn(3, 4)).sum().backward()
    monitor.step()
    assert walks == [1]
    monitor.close()


def test_a_list_of_parameters_is_fixed():
    model = make_model()
    sink = ListSink()
    monitor = gradstats.GradMonitor(list(model.named_parameters()), sinks=[sink])
    add_head(model)
    model(torch.randn(3, 4)).sum().backward()
    monitor.step()
    assert list(sink.records[0].norms) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    monitor.close()


def test_a_plain_list_is_fixed_when_the_caller_appends_to_it_later():
    model = make_model()
    params = list(model.parameters())
    sink = ListSink()
    monitor = gradstats.GradMonitor(params, sinks=[sink])
    params.append(torch.nn.Parameter(torch.ones(2)))  # the caller's list, not the monitor's
    params[-1].grad = torch.ones(2)
    model(torch.randn(3, 4)).sum().backward()
    monitor.step()
    assert list(sink.records[0].norms) == ["0", "1", "2", "3"]
    monitor.close()


def test_duplicate_names_in_pairs_are_refused():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="'w' appears more than once"):
        gradstats.GradMonitor([("w", a), ("v", a), ("w", b)], sinks=[])


def test_a_deleted_none_entry_and_an_added_parameter_in_one_step_are_seen():
    """``del`` of a ``None`` entry (a bias=False Linear's bias) plus a new parameter keeps the
    entry count: the deleted key must not read as the ``None`` it held."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    monitor = gradstats.GradMonitor(model, sinks=None)
    model(torch.randn(3, 2)).sum().backward()
    monitor.step()
    del model[0].bias
    model[0].extra = torch.nn.Parameter(torch.ones(2))
    model[0].extra.grad = torch.full((2,), 1e3)
    monitor.step(max_norm=1.0)
    assert torch.linalg.vector_norm(model[0].extra.grad) < 1.0
    monitor.close()
