"""Run by tests/callbacks/test_curvature_monitor.py: CurvatureMonitor under 2-process CPU DDP (gloo) at the first
batch and at the end of training, then the same quantities in one process on the union of the two ranks' batches
with the initial and with the trained weights. Writes the metric dicts and the densities to the JSON path given.

float64, and no load-balance loss: that loss multiplies two batch means, so its Hessian on a union is not the
mean of the shards' (the task MSE and the z-loss are means over samples and split exactly)."""

import copy
import json
import sys

import lightning as L
import torch
import torch.distributed as dist
from helpers import quiet_trainer
from lightning.pytorch import Callback

from moe_lightning.callbacks import CurvatureMonitor
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig

OPTIONS = {"eigen_max_iter": 12, "eigen_tol": 0.0, "top_k": 2, "trace_max_samples": 9, "density_starts": 2}
OPTIONS |= {"density_steps": 8, "param_groups": {"router": "*router*"}, "at_fit_start": True, "every_n_steps": 100}


class GatherBatches(Callback):
    """The monitor's fit-start values, and every rank's first batch, gathered to all ranks while the process group
    is alive (after the monitor's end-of-training computation, which comes first in the callback list)."""

    def __init__(self, monitor):
        self.monitor, self.batches, self.first = monitor, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first is None:
            self.first = dict(self.monitor.last)

    def on_train_end(self, trainer, pl_module):
        self.batches = [None] * trainer.world_size
        dist.all_gather_object(self.batches, self.monitor.batch)


def main(out_path: str) -> None:
    L.seed_everything(0)
    config = MLPMoEConfig(
        input_dim=4, output_dim=2, dim=8, expert_hidden=4, num_experts=2, top_k=1, num_blocks=1, routing="soft"
    )
    module = MLPMoEModule(config, load_balance_coef=0.0).double()
    initial = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(64, 4, generator=gen, dtype=torch.float64),
        torch.randn(64, 2, generator=gen, dtype=torch.float64),
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    monitor = CurvatureMonitor(**OPTIONS)
    gather = GatherBatches(monitor)
    trainer = quiet_trainer(2, "ddp", 1, [monitor, gather])
    trainer.fit(module, data)
    if not trainer.is_global_zero:
        return
    ddp, ddp_density = dict(monitor.last), monitor.last_densities["curvature"].density.tolist()
    union = tuple(torch.cat([b[i] for b in gather.batches]) for i in range(2))
    single_monitor = CurvatureMonitor(**OPTIONS)
    single_monitor.batch = union
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    one.strategy.connect(initial)
    single_first = single_monitor.compute(one, initial)
    one.strategy.connect(module)  # the trained weights, the same on every rank
    one.optimizers = trainer.optimizers  # Adam's state, the same on every rank: the preconditioned sharpness
    single = single_monitor.compute(one, module)
    single_density = single_monitor.last_densities["curvature"].density.tolist()
    with open(out_path, "w") as f:
        json.dump(
            {
                "ddp": ddp,
                "single": single,
                "ddp_first": gather.first,
                "single_first": single_first,
                "ddp_density": ddp_density,
                "single_density": single_density,
                "world_size": trainer.world_size,
                "steps": monitor.computed_steps,
                "shard_rows": [len(b[0]) for b in gather.batches],
                "shards_differ": not torch.equal(gather.batches[0][0], gather.batches[1][0]),
            },
            f,
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
