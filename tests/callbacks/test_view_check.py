"""GeometryMonitor checks every layer's view at its first probe: a layer with random routing, a token-coupled layer
and a wrong hand-written view are each refused with one warning naming the layer, the check and the miss, and no
key of theirs is logged; a right view in the same model is probed as usual."""

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import read_metrics
from lightning.pytorch.loggers import CSVLogger
from moe_layers import RandomSecondExpertMoE, SlotMoE
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.adapters import register_moe_class
from moe_lightning.callbacks import GeometryMonitor
from moe_lightning.nn.layer import MoEConfig, MoELayer

pytestmark = pytest.mark.integration  # trains


class SwappedGatesMoE(MoELayer):
    """A layer whose hand-written view (below) swaps the gates of experts 0 and 1."""


for cls in (RandomSecondExpertMoE, SlotMoE):
    register_moe_class(cls, gates=lambda m, x: m.view_gates(x), expert=lambda m, e, x: m.experts[e](x), num_experts=4)
register_moe_class(
    SwappedGatesMoE,
    gates=lambda m, x: m.router.gates(x)[:, [1, 0, 2, 3]],
    expert=lambda m, e, x: m.expert_fn(e, x),
    num_experts=4,
)


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = MoEConfig(dim=8, expert_hidden=8, num_experts=4, top_k=2)
        self.right, self.swapped = MoELayer(config), SwappedGatesMoE(config)
        self.random, self.slots = RandomSecondExpertMoE(), SlotMoE()

    def forward(self, x):
        for layer in (self.right, self.swapped, self.random, self.slots):
            out = layer(x)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x

    def training_step(self, batch, _):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_refused_views_warn_once_and_log_nothing(tmp_path):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 8)), batch_size=32)
    monitor = GeometryMonitor(every_n_steps=1, max_tokens=32, layer_jacobian=False, pca=False, subspaces=False)
    trainer = L.Trainer(
        max_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[monitor],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Model(), data)
    refusals = [str(w.message) for w in caught if "GeometryMonitor: the check of" in str(w.message)]
    expected = {"swapped": "reconstruction", "random": "determinism", "slots": "per-token"}
    assert len(refusals) == 3, refusals
    for layer, check in expected.items():
        (line,) = [r for r in refusals if r.startswith(f"GeometryMonitor: the check of {layer!r} failed")]
        assert f"fails the {check} check (relative miss " in line and f"no value of {layer!r} is logged" in line
    assert "the per-token Jacobian is not defined" in next(r for r in refusals if "'slots'" in r)
    keys = {k for row in read_metrics(tmp_path) for k, v in row.items() if v not in ("", None)}
    assert "geometry/right/jac_sigma_max/mean" in keys
    assert not [k for k in keys if k.split("/")[1:2] in (["swapped"], ["random"], ["slots"])]
    assert [v.name for v in monitor.views] == ["right"]
