"""What the monitors log beside scalars, where the logger supports it (rank zero only): histograms for TensorBoard
and W&B, W&B tables and heatmap images. matplotlib and wandb load only when a W&B logger is there."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from torch import Tensor

from moe_lightning.callbacks._observe import tensorboard_loggers, wandb_loggers
from moe_lightning.geometry import GeometryReport, SpectralDensity


def log_geometry_media(trainer: Trainer, reports: dict[str, GeometryReport], step: int) -> None:
    """Each layer's mean Jacobian spectrum as a histogram (TensorBoard, W&B) and a ``geometry/spectra`` W&B table
    (step, layer, expert, index, sigma), and its alignment and overlap matrices as W&B heatmaps."""
    for logger in tensorboard_loggers(trainer):
        for name, report in reports.items():
            spectra = report.spectra.get("jac_mean_spectrum")
            if spectra is not None and torch.isfinite(spectra).any():
                values = spectra[torch.isfinite(spectra)].float().cpu()
                logger.experiment.add_histogram(f"geometry/{name}/jac_spectrum", values, step)
    wandbs = wandb_loggers(trainer)
    if not wandbs:
        return
    import matplotlib.pyplot as plt
    import wandb

    for logger in wandbs:
        run = logger.experiment
        payload: dict[str, Any] = {"trainer/global_step": step}
        rows = []
        for name, report in reports.items():
            spectra = report.spectra.get("jac_mean_spectrum")
            if spectra is not None:
                finite = spectra[torch.isfinite(spectra)].double().cpu()
                if finite.numel():
                    payload[f"geometry/{name}/jac_spectrum_hist"] = wandb.Histogram(finite.numpy())
                for e, row in enumerate(spectra.double().cpu().tolist()):
                    rows.extend([step, name, e, i + 1, s] for i, s in enumerate(row))
            for key, matrix in report.matrices.items():
                if key.endswith("projection") or key.endswith("geodesic"):
                    continue
                figure = heatmap_figure(matrix, f"{name} {key} (step {step})")
                payload[f"geometry/{name}/{key}_heatmap"] = wandb.Image(figure)
                plt.close(figure)
        if rows:
            payload["geometry/spectra"] = wandb.Table(columns=["step", "layer", "expert", "index", "sigma"], data=rows)
        run.log(payload)


def log_density_media(trainer: Trainer, densities: dict[str, SpectralDensity], step: int) -> None:
    """Each parameter set's Hessian spectral density as a histogram of expected eigenvalue counts per grid cell
    (TensorBoard, W&B) and a ``curvature/density`` W&B table (step, params, eigenvalue, density)."""
    for logger in tensorboard_loggers(trainer):
        for prefix, d in densities.items():
            counts, edges = d.histogram()
            logger.experiment.add_histogram_raw(
                f"{prefix}/hessian_density",
                min=float(edges[0]),
                max=float(edges[-1]),
                num=float(counts.sum()),
                sum=float((d.grid * counts).sum()),
                sum_squares=float((d.grid**2 * counts).sum()),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )
    wandbs = wandb_loggers(trainer)
    if not wandbs:
        return
    import wandb

    for logger in wandbs:
        payload: dict[str, Any] = {"trainer/global_step": step}
        rows = []
        for prefix, d in densities.items():
            counts, edges = d.histogram()
            payload[f"{prefix}/hessian_density"] = wandb.Histogram(np_histogram=(counts.numpy(), edges.numpy()))
            rows.extend([step, prefix, t, v] for t, v in zip(d.grid.tolist(), d.density.tolist(), strict=True))
        payload["curvature/density"] = wandb.Table(columns=["step", "params", "eigenvalue", "density"], data=rows)
        logger.experiment.log(payload)


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
