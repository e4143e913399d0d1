"""Run by tests/callbacks/test_geometry_monitor.py: GeometryMonitor under 2-process CPU DDP (gloo), probing at step 2
and at the end of training (step 3), then the same probe set probed in one process with the final weights. Writes
both scalar dicts and both bootstraps (resamples drawn over the global probe set) to the JSON path given."""

import json
import sys

import lightning as L
import torch
from helpers import quiet_trainer

from moe_lightning.adapters import find_moe_layers
from moe_lightning.adapters.capture import capture_layer_inputs
from moe_lightning.callbacks import GeometryMonitor
from moe_lightning.common import observation
from moe_lightning.data import SyntheticMoEDataModule
from moe_lightning.geometry import probe
from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn.models import MLPMoEConfig


def main(out_path: str) -> None:
    L.seed_everything(0)
    # input_dim = dim: a rank-deficient input would make the rank-8 PCA subspace ill-defined (tiny eigen-gap)
    config = MLPMoEConfig(input_dim=16, output_dim=8, dim=16, expert_hidden=16, num_experts=4, num_blocks=2)
    module = MLPMoEModule(config)
    data = SyntheticMoEDataModule(input_dim=16, output_dim=8, num_train=256, num_val=128, batch_size=32)
    monitor = GeometryMonitor(every_n_steps=2, max_tokens=70, at_fit_start=False, bootstrap=3)
    trainer = quiet_trainer(2, "ddp", 3, [monitor], limit_val_batches=1.0)
    trainer.fit(module, data)
    if not trainer.is_global_zero:
        return
    ddp, ddp_bootstrap = {}, {}
    for name, report in monitor.last_reports.items():
        ddp.update(report.scalars(f"geometry/{name}"))
        ddp_bootstrap[name] = report.bootstrap
    single, single_bootstrap = {}, {}
    views = find_moe_layers(module.model)
    with observation(module):
        captured = capture_layer_inputs(module, views, monitor.probe_inputs)
        for view in views:
            report = probe(view, captured[view.name][:70], monitor.probe_config)
            single.update(report.scalars(f"geometry/{view.name}"))
            single_bootstrap[view.name] = report.bootstrap
    result = {"ddp": ddp, "single": single, "world_size": trainer.world_size, "steps": monitor.probed_steps}
    result.update(ddp_bootstrap=ddp_bootstrap, single_bootstrap=single_bootstrap)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
