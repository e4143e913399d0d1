"""RouterMonitor checks the views whose gates it recomputes, as GeometryMonitor does: a layer with random routing, a
token-coupled layer, a wrong hand-written view and one that cannot run are each refused with one warning, no key of
theirs is logged, the other layers lose nothing, and training ends in the weights it ends in without the monitor. A
moe-lightning layer is summarised from its router's own outputs and is not checked. CurvatureMonitor reads no view:
the Hessian of the model's own loss with respect to a refused layer's weights is exact, and it is logged.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``P`` parameters.
"""

import copy

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fit_warned, logged, read_metrics
from moe_layers import RandomSecondExpertMoE, SlotMoE
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.adapters import register_moe_class
from moe_lightning.callbacks import CurvatureMonitor, RouterMonitor
from moe_lightning.nn.layer import MoEConfig, MoELayer

pytestmark = pytest.mark.integration  # trains


class Top2MoE(RandomSecondExpertMoE):
    """The same layer with its second expert chosen deterministically: its top-2 view describes it."""

    def forward(self, x):
        x_ND = x.reshape(-1, x.shape[-1])
        gates_NE = self.view_gates(x_ND)
        return sum(gates_NE[:, e : e + 1] * expert(x_ND) for e, expert in enumerate(self.experts)).reshape(x.shape)


class SwappedTop2MoE(Top2MoE):
    """A layer whose hand-written view (below) swaps the gates of experts 0 and 1."""


class BrokenViewMoE(Top2MoE):
    """A layer whose hand-written view cannot run."""


def broken_gates(module, x_ND):
    raise RuntimeError("this view's gates cannot run")


class SwappedGatesMoE(MoELayer):
    """A moe-lightning layer with the same wrong view: it hands over its router's outputs, which RouterMonitor reads."""


for cls in (RandomSecondExpertMoE, SlotMoE, Top2MoE):
    register_moe_class(cls, gates=lambda m, x: m.view_gates(x), expert=lambda m, e, x: m.experts[e](x), num_experts=4)
register_moe_class(
    SwappedTop2MoE,
    gates=lambda m, x: m.view_gates(x)[:, [1, 0, 2, 3]],
    expert=lambda m, e, x: m.experts[e](x),
    num_experts=4,
)
register_moe_class(BrokenViewMoE, gates=broken_gates, expert=lambda m, e, x: m.experts[e](x), num_experts=4)
register_moe_class(
    SwappedGatesMoE,
    gates=lambda m, x: m.router.gates(x)[:, [1, 0, 2, 3]],
    expert=lambda m, e, x: m.expert_fn(e, x),
    num_experts=4,
)
REFUSED = {"plain_swapped": "reconstruction", "random": "determinism", "slots": "per-token"}


class Model(L.LightningModule):
    def __init__(self, layers=("right", "swapped", "plain", "plain_swapped", "random", "slots", "broken")):
        super().__init__()
        torch.manual_seed(0)
        config = MoEConfig(dim=8, expert_hidden=8, num_experts=4, top_k=2)
        make = {
            "right": lambda: MoELayer(config),
            "swapped": lambda: SwappedGatesMoE(config),
            "plain": Top2MoE,
            "plain_swapped": SwappedTop2MoE,
            "random": RandomSecondExpertMoE,
            "slots": SlotMoE,
            "broken": BrokenViewMoE,
        }
        self.order = list(layers)
        for name in self.order:
            setattr(self, name, make[name]())

    def forward(self, x):
        for name in self.order:
            out = getattr(self, name)(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x

    def training_step(self, batch, _):
        return loss(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def fit(tmp_path, model, callbacks):
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 8)), batch_size=32)
    return fit_warned(model, data, tmp_path, callbacks), data


def logged_keys(tmp_path) -> set[str]:
    return {k for row in read_metrics(tmp_path) for k, v in row.items() if v not in ("", None)}


def numpy_top2_load(layer: Top2MoE, x_ND: np.ndarray) -> np.ndarray:
    """Each expert's share of the top-2 assignments of ``x_ND``, from the gate's weights (numpy)."""
    logits_NE = x_ND @ layer.gate.weight.detach().double().numpy().T
    chosen_N2 = np.argsort(-logits_NE, axis=-1, kind="stable")[:, :2]
    counts_E = np.bincount(chosen_N2.ravel(), minlength=logits_NE.shape[1])
    return counts_E / counts_E.sum()


def test_router_monitor_refuses_what_the_view_check_refuses_and_training_is_unchanged(tmp_path):
    model = Model()
    start = copy.deepcopy(model)
    inputs = {}
    handle = start.plain.register_forward_hook(lambda m, args, out: inputs.setdefault("plain", args[0].detach()))
    monitor = RouterMonitor()
    groups = {"slots": "slots.slot_embeds"}  # the cheapest group; its values are tested below
    curvature = CurvatureMonitor(trace=False, density=False, full_model=False, loss_fn=loss, param_groups=groups)
    messages, data = fit(tmp_path / "with", model, [monitor, curvature])
    keys = logged_keys(tmp_path / "with")
    refusals = [m for m in messages if "RouterMonitor: the check of" in m]
    assert len(refusals) == 4, refusals
    for layer, check in REFUSED.items():
        (line,) = [m for m in refusals if m.startswith(f"RouterMonitor: the check of {layer!r} failed")]
        assert f"fails the {check} check (relative miss " in line and f"no value of {layer!r} is logged" in line
    (line,) = [m for m in refusals if m.startswith("RouterMonitor: the check of 'broken' failed")]
    assert "could not be checked (its reconstruction check stopped: RuntimeError: this view's gates" in line
    # the broken view's failure in the first batch is its refusal alone: the others' first window is logged
    assert not [m for m in messages if "router summary" in m], messages
    assert not [k for k in keys if k.startswith("router/") and k.split("/")[1] in {*REFUSED, "broken"}]
    # the moe-lightning layer with a wrong view is summarised from its router's own outputs, not checked
    assert [v.name for v in monitor.views] == ["right", "swapped", "plain"]
    assert {f"router/{name}/load_cv" for name in ("right", "swapped", "plain")} <= keys
    # the window of step 0 is the first batch, routed by the initial weights
    start(next(iter(data))[0])
    handle.remove()
    expected = numpy_top2_load(start.plain, inputs["plain"].double().numpy())
    rows = read_metrics(tmp_path / "with")
    got = [logged(rows, f"router/plain/load/e{e}")[0] for e in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # the check's forwards draw random routing in the layer; the RNG is put back, so training is that of no monitor
    alone = Model()
    fit(tmp_path / "without", alone, [])
    for (name, a), b in zip(model.state_dict().items(), alone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def exact_hessian(model: Model, batch, name: str) -> np.ndarray:
    """The ``(P, P)`` Hessian of ``loss(model, batch)`` with respect to the parameter ``name`` (autograd)."""
    params = dict(model.named_parameters())

    def of(p):
        return loss(lambda x: functional_call(model, {**params, name: p}, (x,)), batch)

    p = params[name].detach()
    return torch.autograd.functional.hessian(of, p).reshape(p.numel(), p.numel()).double().numpy()


def test_curvature_of_a_refused_layer_is_the_exact_hessian_of_the_loss(tmp_path):
    model = Model(("right", "swapped", "plain_swapped", "slots"))  # deterministic: an exact reference exists
    start = copy.deepcopy(model)
    groups = {"slots": "slots.slot_embeds", "plain_swapped": "plain_swapped.gate.weight"}
    monitor = CurvatureMonitor(
        every_n_steps=100, trace=False, density=False, full_model=False, loss_fn=loss, param_groups=groups
    )
    messages, data = fit(tmp_path, model, [monitor, RouterMonitor()])
    keys = logged_keys(tmp_path)
    assert not [m for m in messages if "CurvatureMonitor: the check" in m]
    assert len([m for m in messages if "RouterMonitor: the check of" in m]) == 2  # plain_swapped, slots
    rows = read_metrics(tmp_path)
    batch = next(iter(data))  # the monitor's batch: the first, at the initial weights (step 0)
    for group, name in groups.items():
        H = exact_hessian(start, batch, name)
        exact = np.linalg.eigvalsh((H + H.T) / 2)
        assert logged(rows, f"curvature/{group}/hessian_eigenvalue/0")[0] == pytest.approx(exact[-1], rel=1e-3)
        assert logged(rows, f"curvature/{group}/hessian_lambda_min")[0] == pytest.approx(exact[0], rel=1e-3, abs=1e-6)
    assert not [k for k in keys if k.startswith("router/") and k.split("/")[1] in REFUSED]
