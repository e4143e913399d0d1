"""Loss-trace guard: the first 20 training losses of the tiny MLP and transformer MoEs, per routing, are committed
under ``tests/assets/losses`` and must come out the same (CPU, float32, fixed seed, one thread) to a relative 1e-5.
Not bit for bit: the float32 kernels of two CPUs (their vector widths) round a few ulps apart, which 20 steps
carry to about 1e-7; a change of the model, the loss or the optimiser moves the losses by far more.

A change that moves them changes the numerics of training. If that is intended, regenerate the files with
``python tests/test_loss_trace.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.lightning.modules import CausalLMModule, MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig, TransformerMoEConfig

ASSETS = Path(__file__).resolve().parent / "assets" / "losses"
STEPS = 20
ROUTINGS = ("dense", "topk", "soft")
VOCAB, SEQ = 64, 16


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def _module_and_data(family: str, routing: str):
    if family == "mlp":
        config = MLPMoEConfig(routing=routing, input_dim=16, output_dim=16, dim=32, expert_hidden=32, num_experts=4)
        data = SyntheticMoEDataModule(input_dim=16, output_dim=16, num_clusters=4, num_train=2048, batch_size=32)
        return MLPMoEModule(config, lr=3e-3, warmup_steps=5), data.train_dataloader()
    config = TransformerMoEConfig(
        routing=routing, vocab_size=VOCAB, dim=32, num_heads=4, num_layers=2, max_seq_len=SEQ, num_experts=4
    )
    tokens = torch.randint(0, VOCAB, (STEPS * 8, SEQ + 1), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8, shuffle=False)
    return CausalLMModule(config, lr=3e-3, warmup_steps=5), loader


def loss_trace(family: str, routing: str) -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions split over threads can round differently
    try:
        L.seed_everything(0, verbose=False)
        module, loader = _module_and_data(family, routing)
        losses = _Losses()
        trainer = L.Trainer(
            accelerator="cpu",
            precision="32-true",
            max_steps=STEPS,
            logger=False,
            callbacks=[losses],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=loader)
        return losses.values
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["mlp", "transformer"])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_first_training_losses_are_unchanged(family, routing):
    expected = json.loads((ASSETS / f"{family}_{routing}.json").read_text())
    got = loss_trace(family, routing)
    assert len(got) == STEPS
    assert got == pytest.approx(expected, rel=1e-5, abs=0)


if __name__ == "__main__":
    ASSETS.mkdir(parents=True, exist_ok=True)
    for family in ("mlp", "transformer"):
        for routing in ROUTINGS:
            values = loss_trace(family, routing)
            (ASSETS / f"{family}_{routing}.json").write_text(json.dumps(values, indent=1) + "\n")
            print(family, routing, values[0], values[-1], file=sys.stderr)
