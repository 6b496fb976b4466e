"""What the monitor tests share: a tiny model, a list sink, NaN injection, snapshots."""
import torch


class ListSink:
    """The documented custom-sink interface: an object with write(record)."""

    def __init__(self):
        self.records = []
        self.closed = False

    def write(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True


def tiny_model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7),
        torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(7, 3, bias=False)),
        torch.nn.LayerNorm(3),
    )
    return model.to(device, dtype)


def backward(model, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    first = next(model.parameters())
    x = torch.randn(4, 5, generator=generator).to(first.device, first.dtype)
    (model(x).square().sum() * scale).backward()


def poison(model, name, value=float("nan")):
    dict(model.named_parameters())[name].grad.view(-1)[1] = value


def snapshot(model, optimizer):
    params = [q.detach().clone() for q in model.parameters()]
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for s in optimizer.state.values()]
    return params, state


def assert_same(a, b):
    """Parameters and optimizer state bit-identical. State a skipped first step created is
    allowed only as the optimizer's own zero initialisation (a fused optimizer makes it on
    the device before it reads found_inf, as under GradScaler)."""
    (params_a, state_a), (params_b, state_b) = a, b
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    if not state_a:
        assert all(not torch.as_tensor(v).any() for s in state_b for v in s.values())
        return
    assert len(state_a) == len(state_b)
    for s, t in zip(state_a, state_b):
        for key in s:
            assert torch.equal(torch.as_tensor(s[key]), torch.as_tensor(t[key])), key
