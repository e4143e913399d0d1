"""Run by tests/test_balancing.py: an aux-free MLP-MoE under 2-process CPU DDP (gloo) with a RouterMonitor. Each rank
saves its final expert biases, the loads it routed at each step, and each batch with the weights that routed it;
rank zero also saves the RouterMonitor's last metrics. Writes ``<out_dir>/rank<r>.pt``."""

import copy
import sys
from pathlib import Path

import lightning as L
import torch
from helpers import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.callbacks import RouterMonitor
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig

CONFIG = MLPMoEConfig(
    input_dim=8, output_dim=4, dim=8, expert_hidden=8, num_experts=4, top_k=1, num_blocks=2,
    scoring="sigmoid", load_balancing="aux_free", bias_update_rate=0.01,
)  # fmt: skip


class Record(L.Callback):
    """Each step's batch and weights at batch start, and the rank's own loads before the bias step sums them."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple] = {}
        self.loads: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = (batch[0].clone(), copy.deepcopy(pl_module.model.state_dict()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        routers = [block.ffn.router for block in pl_module.model.blocks]
        self.loads[trainer.global_step] = [r.pending_load.clone() for r in routers]


def main(out_dir: str) -> None:
    L.seed_everything(0)
    module = MLPMoEModule(CONFIG, lr=1e-2)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(128, 4, generator=torch.Generator().manual_seed(2))
    record, monitor = Record(), RouterMonitor(log_every_n_steps=2)
    trainer = quiet_trainer(2, "ddp", 3, [record, monitor])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False))
    result = {
        "world_size": trainer.world_size,
        "bias": [block.ffn.router.expert_bias.clone() for block in module.model.blocks],
        "loads": record.loads,
        "batches": record.batches,
        "metrics": monitor.last_metrics,
        "logged_step": monitor._logged_step,
    }
    torch.save(result, Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
