"""A real short run shared by the dashboard tests: the MLP top-k config for 20 steps with GeometryMonitor,
RouterMonitor and CurvatureMonitor, logged at once to CSV and to an offline W&B run (which keeps the media)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_lightning import commands as cli

ROOT = Path(__file__).resolve().parents[2]
LOGGED = """
trainer:
  max_steps: 20
  log_every_n_steps: 5
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: "{csv}", name: "", version: ""}}
    - class_path: moe_lightning.lightning.loggers.AutoWandbLogger
      init_args: {{save_dir: "{wandb}", offline: true}}
  callbacks:
    - class_path: moe_lightning.callbacks.GeometryMonitor
      init_args: {{every_n_steps: 10, max_tokens: 64}}
    - class_path: moe_lightning.callbacks.RouterMonitor
    - class_path: moe_lightning.callbacks.CurvatureMonitor
      init_args: {{every_n_steps: 10, top_k: 2, trace_max_samples: 10, density: false}}
model:
  init_args:
    config: {{input_dim: 8, output_dim: 8, dim: 16, expert_hidden: 8, num_experts: 4, num_blocks: 2}}
data:
  init_args: {{input_dim: 8, output_dim: 8, num_clusters: 4, num_train: 512, num_val: 128, batch_size: 64}}
"""


@dataclass
class LoggedRun:
    csv: Path  # the CSVLogger's log directory (metrics.csv, config.yaml, geometry/, curvature/)
    wandb: Path  # the offline W&B run directory (run-<id>.wandb, files/media/)


@pytest.fixture(scope="session")
def logged_run(tmp_path_factory) -> LoggedRun:
    import wandb

    root = tmp_path_factory.mktemp("logged")
    config = root / "logged.yaml"
    config.write_text(LOGGED.format(csv=root / "csv", wandb=root / "wb"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread avoids oversubscribing a shared CPU
    try:
        args = [
            "fit",
            "--config",
            str(ROOT / "configs/mlp/topk.yaml"),
            "--config",
            str(ROOT / "configs/trainer/cpu.yaml"),
        ]
        assert cli.main([*args, "--config", str(config), "--summary=false"]) == 0
    finally:
        torch.set_num_threads(threads)
        wandb.finish()
        wandb.teardown()  # finish() can return before the service has flushed the end of the .wandb file
    (wandb_dir,) = (root / "wb" / "wandb").glob("offline-run-*")
    return LoggedRun(csv=root / "csv", wandb=wandb_dir)
