"""Shared machinery of the callbacks: copying batches into callback state, logging to every Lightning logger,
heatmaps, and where the callbacks look for MoE layers."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import Tensor, nn


def batch_inputs(batch: Any, input_key: str | int = 0) -> Any:
    """The model input of a batch: ``batch[input_key]`` of a tuple/list/dict, or the batch itself."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch[input_key if isinstance(input_key, str) else "input_ids"]
    if isinstance(batch, (list, tuple)):
        return batch[input_key if isinstance(input_key, int) else 0]
    raise ValueError(f"cannot take model inputs from a batch of type {type(batch).__name__}; pass input_key")


def cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of a batch (tensors, or dicts/lists/tuples of them), for callback state."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def log_scalars(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    """The same scalar keys to every logger of the trainer, at the trainer's step (rank zero only)."""
    if not trainer.is_global_zero or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def define_step_metric(trainer: Trainer, prefix: str) -> None:
    """Plot every W&B key under ``prefix`` (e.g. ``"router/*"``) against ``trainer/global_step``, the step each
    callback logs at, instead of W&B's own call counter (rank zero only; other loggers need nothing)."""
    if not trainer.is_global_zero:
        return
    for logger in wandb_loggers(trainer):
        logger.experiment.define_metric("trainer/global_step")
        logger.experiment.define_metric(prefix, step_metric="trainer/global_step")


def report_directory(trainer: Trainer, explicit: str | None = None) -> str | None:
    """Where a callback writes its per-step reports: ``explicit`` if given, else the first CSV or TensorBoard
    logger's ``log_dir``, else the W&B run's files directory, so the reports travel with the run; ``None`` when
    there is none of them."""
    if explicit is not None:
        return explicit
    for logger in trainer.loggers:
        if isinstance(logger, (CSVLogger, TensorBoardLogger)):
            return logger.log_dir
    for logger in wandb_loggers(trainer):
        return logger.experiment.dir
    return None


def write_step_report(root: str, kind: str, step: int, payload: dict[str, Any]) -> str:
    """Write ``payload`` as ``<root>/<kind>/step_<step, 7 digits>.json`` (what ``moe-lightning report`` reads).

    Written next to the target and renamed, so readers never see a half-written file. Returns the path.
    """
    folder = os.path.join(root, kind)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:07d}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(payload, handle)
    os.replace(path + ".tmp", path)
    return path


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def heatmap_figure(matrix: Tensor, title: str):
    """A labelled matplotlib heatmap of an (E, E) matrix (Agg backend; no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    values = matrix.detach().double().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4, 3.4), dpi=100)
    finite = values[np.isfinite(values)]
    vmax = float(finite.max()) if finite.size else 1.0
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def observed_model(pl_module: LightningModule) -> nn.Module:
    """Where the callbacks look for MoE layers: the LightningModule's ``model`` attribute when it is an
    ``nn.Module`` (the litgpt convention our modules follow, giving names like ``blocks.0.ffn``), else the
    LightningModule itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module
