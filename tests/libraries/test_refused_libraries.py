"""The real layers that tests/moe_layers.py stands for, seen through the view a user would write for each, are refused
by the view check: fairscale's ``MOELayer`` with ``Top2Gate`` (its second expert is drawn at random) by the
determinism check, lucidrains' ``SoftMoE`` (tokens coupled through the slots) by the per-token check. In training,
GeometryMonitor and RouterMonitor warn once each and log no key of the layer; CurvatureMonitor, which reads no view,
logs the curvature of the loss and names no layer.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``B`` sequences, ``T`` tokens per sequence.
"""

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import fit_warned, read_metrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.adapters import CallableView, find_moe_layers, register_moe_class
from moe_lightning.adapters.verify import check_views
from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor
from moe_lightning.geometry import verify_view
from moe_lightning.nn.layer import MoEConfig, MoELayer

pytestmark = pytest.mark.integration  # trains

DIM, EXPERTS = 8, 4
WHY = {"determinism": "two forwards of the layer on the same tokens disagree", "per-token": "depends on the other"}


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: fairscale's ``MOELayer`` asks its size when built and exchanges tokens all-to-all
    in every forward."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def top2(probs_NE):
    """The deterministic top-2 a user would write for ``Top2Gate``: the two largest probabilities, renormalised."""
    top_N2, index_N2 = probs_NE.topk(2, dim=-1)
    return torch.zeros_like(probs_NE).scatter(-1, index_N2, top_N2 / top_N2.sum(-1, keepdim=True))


class FairscaleBlock(nn.Module):
    """fairscale's ``MOELayer`` as a model feeds it: the tokens in ``E`` groups, ``(E, N / E, D)``, since the layer
    asserts that its first dimension is a multiple of its local experts (and ``Top2Gate`` that ``N`` is one of
    ``E``)."""

    def __init__(self):
        super().__init__()
        from fairscale.nn import MOELayer, Top2Gate

        self.moe = MOELayer(Top2Gate(DIM, EXPERTS), nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(EXPERTS)))

    def forward(self, x):
        return self.moe(x.reshape(EXPERTS, -1, DIM)).reshape(x.shape)


def soft_moe():
    from soft_moe_pytorch import SoftMoE

    return SoftMoE(DIM, num_experts=EXPERTS, num_slots=1, expert_mult=1)


def soft_moe_gates(m, x_ND):
    """Each token's combine weight summed over an expert's slots (soft_moe_pytorch/soft_moe.py, ``forward``)."""
    logits_NES = torch.einsum("nd,esd->nes", m.norm(x_ND), m.slot_norm(m.slot_embeds))
    return logits_NES.flatten(1).softmax(-1).reshape(logits_NES.shape).sum(-1)


def fairscale_layer(process_group):
    pytest.importorskip("fairscale", reason="fairscale is not installed (pip install -e .[libs])")
    register_moe_class(
        FairscaleBlock,
        gates=lambda m, x: top2(m.moe.gate.wg(x).softmax(-1)),
        expert=lambda m, e, x: m.moe.experts[e](x),
        num_experts=EXPERTS,
    )
    return FairscaleBlock()


def soft_moe_layer(process_group):
    soft_moe_pytorch = pytest.importorskip(
        "soft_moe_pytorch", reason="soft-moe-pytorch is not installed (pip install -e .[libs])"
    )
    register_moe_class(
        soft_moe_pytorch.SoftMoE,
        gates=soft_moe_gates,
        expert=lambda m, e, x: m.experts.experts[e](m.norm(x)),
        num_experts=lambda m: m.experts.num_experts,
    )
    return soft_moe()


LIBRARIES = {"fairscale": (fairscale_layer, "determinism"), "soft-moe-pytorch": (soft_moe_layer, "per-token")}


@pytest.mark.parametrize("library", LIBRARIES)
def test_the_check_refuses_the_view_with_the_right_check(library, process_group):
    make, check = LIBRARIES[library]
    torch.manual_seed(0)
    (view,) = find_moe_layers(nn.ModuleDict({"layer": make(process_group)}))
    x_ND = torch.randn(32, DIM)
    found = verify_view(view, x_ND)
    assert found == check_views([view], {"layer": x_ND})["layer"]
    assert found.failed == check and not found.stopped and found.miss > 100 * found.tolerance
    assert found.message().startswith(f"the view of 'layer' fails the {check} check") and WHY[check] in found.message()


def test_fairscale_moe_layer_itself_cannot_be_run_on_the_check_tokens(process_group):
    """A view whose module is the ``MOELayer`` itself is refused too: the check calls the layer on one sequence
    ``(1, N, D)`` (or ``(N, D)``), which it asserts against, so the check stops at its first step."""
    block = fairscale_layer(process_group)
    gates = lambda x: top2(block.moe.gate.wg(x).softmax(-1))  # noqa: E731
    view = CallableView(name="moe", module=block.moe, gates_fn=gates, expert_fns=list(block.moe.experts))
    found = verify_view(view, torch.randn(32, DIM))
    assert (found.failed, found.stopped) == ("determinism", True)
    assert "could not be checked" in found.message() and "AssertionError" in found.message()


class Model(L.LightningModule):
    """A right moe-lightning layer, then the library's layer, on ``(B, T, D)`` sequences."""

    def __init__(self, layer):
        super().__init__()
        torch.manual_seed(0)
        self.right = MoELayer(MoEConfig(dim=DIM, expert_hidden=DIM, num_experts=EXPERTS, top_k=2))
        self.layer = layer

    def forward(self, x):
        x = x + self.right(x)[0]
        return x + self.layer(x)

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch, _):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("library", LIBRARIES)
def test_the_monitors_log_no_key_of_the_refused_layer(library, process_group, tmp_path):
    make, check = LIBRARIES[library]
    model = Model(make(process_group))
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(16, 4, DIM), torch.randn(16, 4, DIM)), batch_size=8)  # 32 tokens
    callbacks = [
        GeometryMonitor(every_n_steps=1, max_tokens=32, layer_jacobian=False, pca=False, subspaces=False),
        RouterMonitor(),
        CurvatureMonitor(every_n_steps=1, trace=False, density=False, eigen_max_iter=8),
    ]
    messages = fit_warned(model, data, tmp_path, callbacks)
    for monitor in ("GeometryMonitor", "RouterMonitor"):
        (line,) = [m for m in messages if m.startswith(f"{monitor}: the check of")]
        assert line.startswith(f"{monitor}: the check of 'layer' failed: the view of 'layer' fails the {check} check")
        assert line.endswith("no value of 'layer' is logged. Training goes on.")
    assert not [m for m in messages if m.startswith("CurvatureMonitor")], messages  # it reads no view: no check
    keys = {k for row in read_metrics(tmp_path) for k, v in row.items() if v not in ("", None)}
    assert not [k for k in keys if "/layer/" in k]
    assert {"geometry/right/jac_sigma_max/mean", "router/right/load_cv", "curvature/hessian_top_eigenvalue"} <= keys
