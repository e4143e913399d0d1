"""The monitors' saved reports: one JSON file per probe step, ``<root>/<kind>/step_<step>.json``, next to the run's
logs, which ``moe-lightning report`` plots from (GeometryMonitor's full reports, CurvatureMonitor's densities)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from moe_lightning.callbacks._observe import wandb_loggers
from moe_lightning.common import dtype_name
from moe_lightning.geometry import GeometryReport, SpectralDensity


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
        handle.write(json.dumps(payload))  # the same text as json.dump, encoded in C: several times faster
    os.replace(path + ".tmp", path)
    return path


def save_geometry_reports(
    trainer: Trainer, report_dir: str | None, reports: dict[str, GeometryReport], step: int, dtype: torch.dtype
) -> None:
    """``geometry/step_<step>.json``: every layer's full report (:meth:`GeometryReport.to_dict`) at ``step``,
    probed in ``dtype``; nothing when there is nowhere to write (:func:`report_directory`)."""
    root = report_directory(trainer, report_dir)
    if root is None:
        return
    payload = {
        "step": step,
        "epoch": trainer.current_epoch,
        "dtype": dtype_name(dtype),
        "layers": {name: report.to_dict() for name, report in reports.items()},
    }
    write_step_report(root, "geometry", step, payload)


def save_densities(trainer: Trainer, report_dir: str | None, densities: dict[str, SpectralDensity], step: int) -> None:
    """``curvature/step_<step>.json``: each parameter set's spectral density (grid, density, quadrature nodes and
    weights) at ``step``; nothing when there is nowhere to write (:func:`report_directory`)."""
    root = report_directory(trainer, report_dir)
    if root is None:
        return
    payload: dict[str, Any] = {"step": step, "epoch": trainer.current_epoch, "densities": {}}
    for prefix, d in densities.items():
        payload["densities"][prefix] = {
            "grid": d.grid.tolist(),
            "density": d.density.tolist(),
            "nodes": d.nodes.tolist(),
            "weights": d.weights.tolist(),
            "sigma": d.sigma,
            "dim": d.dim,
        }
    write_step_report(root, "curvature", step, payload)
