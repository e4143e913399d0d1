"""The parts that keep observation free of side effects, on their own: the probe's cast copies never touch a
parameter, a forward pass's buffer writes are undone and its other state changes are named."""

import importlib

import torch
from torch import nn

from moe_lightning.common.observe import observation, restored_state

probe_module = importlib.import_module("moe_lightning.geometry.probe")


def test_cast_copies_leave_every_parameter_as_it_was():
    layer = nn.Linear(3, 2)
    params = list(layer.parameters())
    before = [(p, p.dtype, p.data_ptr(), p.detach().clone()) for p in params]
    # DDP hangs its all-reduce on each parameter's gradient-accumulation node: it must be the same node afterwards
    nodes = [p.view_as(p).grad_fn.next_functions[0][0] for p in params]
    seen = {}

    def inside():
        seen["dtype"] = layer.weight.dtype
        seen["is_parameter"] = layer.weight is params[0]
        return layer(torch.ones(1, 3, dtype=torch.float64))

    out = probe_module.with_cast_copies(layer, torch.float64, inside)
    assert seen == {"dtype": torch.float64, "is_parameter": False} and out.dtype == torch.float64
    expected = torch.ones(1, 3, dtype=torch.float64) @ before[0][3].double().T + before[1][3].double()
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-12)
    for p, (same, dtype, pointer, values) in zip(params, before, strict=True):
        assert p is same and p.dtype == dtype and p.data_ptr() == pointer and torch.equal(p, values)
    assert [p.view_as(p).grad_fn.next_functions[0][0] for p in params] == nodes
    assert layer.weight is params[0]


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(2))
        self.calls = 0
        self.history: list[int] = []

    def forward(self, x):
        self.seen += x.sum(0)
        self.calls += 1
        self.history.append(1)
        return x


def test_buffers_are_restored_and_other_state_changes_are_named():
    model = nn.Sequential(Counter())
    model[0].seen.fill_(5.0)
    with restored_state(model) as changes:
        model(torch.ones(3, 2))
        assert model[0].seen.tolist() == [8.0, 8.0]
    assert model[0].seen.tolist() == [5.0, 5.0]  # buffer: restored silently
    assert sorted(changes) == ["0.calls", "0.history"]
    assert changes.restored == ["0.calls"]  # a new value is set back; a list appended to in place is not
    assert model[0].calls == 0 and model[0].history == [1]


def test_observation_restores_modes_rng_and_grad_mode():
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2))
    model[1].eval()  # modes differ per submodule
    rng = torch.get_rng_state()
    with observation(model):
        assert not model[0].training and not torch.is_grad_enabled()
        torch.rand(3)
    assert model[0].training and not model[1].training and torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)
