"""The figures of the training report (spectra, geometry curves, alignment heatmaps, PCA spectra, router load,
Hessian spectral density), each drawn from the finished runs grouped by routing; a figure without data is skipped
with a note."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moe_lightning.analysis.decision import LEVEL
from moe_lightning.analysis.experts import expert_mean_pca, expert_mean_spectrum
from moe_lightning.analysis.run import Run, arm_order, final_geometry, layer_names
from moe_lightning.report import plots
from moe_lightning.report.probe_page import PLOTTED_PCA_SITES, alignment_title

MAX_LAYER_PANELS = 4
MAX_PCA_LAYERS = 3  # two sites per layer


def _label(run: Run, multi_family: bool) -> str:
    return f"{run.family or '?'}:{run.arm}" if multi_family else str(run.arm)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Finished runs by arm (``family:arm`` when several families are present; a dense run's arm is its capacity
    control), the controls, top-k and soft first, seeds ascending within a group."""
    done = [r for r in runs if r.ok]
    multi_family = len({r.family for r in done}) > 1
    done.sort(key=lambda r: (r.family or "", arm_order(r.arm), r.seed if r.seed is not None else 1 << 30))
    groups: dict[str, list[Run]] = {}
    for run in done:
        groups.setdefault(_label(run, multi_family), []).append(run)
    return groups


@dataclass
class FigureData:
    """What the figures are drawn from.

    Attributes:
        out_dir: where the PNG files go.
        groups: finished runs by label (:func:`group_runs`).
        finals: label -> ``(seed, {layer: GeometryReport})`` of each run's last geometry report.
        layers: every layer name in those reports, in order of first appearance.
    """

    out_dir: str
    groups: dict[str, list[Run]]
    finals: dict[str, list[tuple[int | None, dict[str, Any]]]]
    layers: list[str]

    @classmethod
    def of(cls, runs: list[Run], out_dir: str) -> FigureData:
        groups = group_runs(runs)
        finals: dict[str, list[tuple[int | None, dict[str, Any]]]] = {}
        for label, members in groups.items():
            for run in members:
                loaded = final_geometry(run)
                if loaded is not None:
                    finals.setdefault(label, []).append((run.seed, loaded[1]))
        reports = [layers for entries in finals.values() for _, layers in entries]
        layers = list(dict.fromkeys(name for layers in reports for name in layers))
        return cls(out_dir, groups, finals, layers)

    @property
    def shown_layers(self) -> list[str]:
        """The layers that get a panel (the first :data:`MAX_LAYER_PANELS`)."""
        return self.layers[:MAX_LAYER_PANELS]

    def more(self, shown: int = MAX_LAYER_PANELS) -> str:
        """A title suffix saying that only the first ``shown`` layers are drawn (empty when all are)."""
        return f" (first {shown} of {len(self.layers)} layers)" if len(self.layers) > shown else ""

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)


def spectra_panels(data: FigureData) -> list[tuple[str, dict[str, list[np.ndarray]]]]:
    """Mean expert-Jacobian spectrum per layer at the final probe step, one series per routing."""
    panels = []
    for layer in data.shown_layers:
        series = {
            label: [s for _, lay in entries if layer in lay and (s := expert_mean_spectrum(lay[layer])) is not None]
            for label, entries in data.finals.items()
        }
        series = {k: v for k, v in series.items() if v}
        if series:
            panels.append((layer, series))
    return panels


def spectra_figure(data: FigureData) -> str | None:
    """Mean expert-Jacobian spectrum per layer at the final probe step, one line per routing."""
    panels = spectra_panels(data)
    if not panels:
        return None
    return plots.plot_spectrum_panels(
        panels,
        data.path("spectra.png"),
        f"Mean expert-Jacobian spectrum, final probe step{data.more()}\n"
        "(experts averaged with weights Σw; mean over seeds, min–max over seeds shaded)",
        ylabel="singular value σ_i",
    )


def curves_panels(data: FigureData) -> list[tuple[str, str, dict[str, list[pd.Series]]]]:
    """σ_max and the Jacobian effective rank over training, averaged over layers, and the validation loss, per run of
    each routing."""
    panels = []
    for key, title, ylabel in (
        ("jac_sigma_max/mean", "σ_max (expert mean), mean over layers", "σ_max"),
        ("jac_effective_rank/mean", "Jacobian effective rank (expert mean), mean over layers", "effective rank"),
    ):
        series: dict[str, list[pd.Series]] = {}
        for label, members in data.groups.items():
            for run in members:
                columns = [f"geometry/{la}/{key}" for la in layer_names(run.history)]
                columns = [c for c in columns if c in run.history.columns]
                if columns:
                    series.setdefault(label, []).append(run.history[columns].mean(axis=1, skipna=True).dropna())
        if series:
            panels.append((title, ylabel, series))
    # The validation loss beside the geometry, so that a reader sees where training stands at each probe (a run
    # trained to its plateau shows the flat end of this curve).
    series = {}
    for label, members in data.groups.items():
        for run in members:
            if "val/loss" in run.history.columns and not (loss := run.history["val/loss"].dropna()).empty:
                series.setdefault(label, []).append(loss)
    if series and panels:
        panels.append(("Validation loss", "validation loss", series))
    return panels


def curves_figure(data: FigureData) -> str | None:
    """σ_max and the Jacobian effective rank over training, averaged over layers, and the validation loss."""
    panels = curves_panels(data)
    if not panels:
        return None
    return plots.plot_curve_panels(
        panels, data.path("curves.png"), "Geometry over training (mean over seeds, min–max band)"
    )


def alignment_items(data: FigureData) -> list[tuple[str, np.ndarray]]:
    """The mean-Jacobian alignment matrix of each routing and layer, from the lowest seed that has it."""
    items = []
    for label, entries in data.finals.items():
        for layer in data.shown_layers:
            for seed, lay in entries:  # the first seed (lowest) that has this layer's matrix
                report = lay.get(layer)
                if report is not None and report.num_experts > 1 and "align_mean_jacobian" in report.matrices:
                    title = alignment_title(f"{label}, {layer}, seed {seed}", report)
                    items.append((title, report.matrices["align_mean_jacobian"].double().numpy()))
                    break
    return items


def alignment_figure(data: FigureData) -> str | None:
    """The mean-Jacobian alignment matrix of each routing and layer, from the lowest seed that has it."""
    items = alignment_items(data)
    if not items:
        return None
    return plots.plot_heatmaps(
        items,
        data.path("alignment.png"),
        "Mean-Jacobian alignment |cos(J̄_i, J̄_j)| at the final probe step (chance: E|cos| of Gaussian matrices)",
    )


def pca_panels(data: FigureData) -> list[tuple[str, dict[str, list[np.ndarray]]]]:
    """Weighted PCA eigenvalues of the plotted sites at the final probe step, one series per routing."""
    panels = []
    for site in PLOTTED_PCA_SITES:
        for layer in data.layers[:MAX_PCA_LAYERS]:
            series = {
                label: [
                    v for _, lay in entries if layer in lay and (v := expert_mean_pca(lay[layer], site)) is not None
                ]
                for label, entries in data.finals.items()
            }
            series = {k: v for k, v in series.items() if v}
            if series:
                panels.append((f"{site} site, {layer}", series))
    return panels


def pca_figure(data: FigureData) -> str | None:
    """Weighted PCA eigenvalues of the plotted sites at the final probe step."""
    panels = pca_panels(data)
    if not panels:
        return None
    return plots.plot_spectrum_panels(
        panels,
        data.path("pca_spectra.png"),
        "Weighted PCA eigenvalues at the final probe step (expert mean, Σw-weighted; mean over seeds)"
        + data.more(MAX_PCA_LAYERS),
        ylabel="eigenvalue λ_k",
        xlabel="component k",
    )


def router_load_panels(data: FigureData) -> list[tuple[str, pd.DataFrame]]:
    """Each expert's share of the routed assignments over training, one seed per routing (expert identities
    differ between seeds)."""
    panels = []
    for label, members in data.groups.items():
        if members[0].routing == "dense":
            continue
        run = members[0]
        prefixes = dict.fromkeys(
            c.rsplit("/load/", 1)[0] for c in run.history.columns if "/load/e" in str(c) and c.startswith("router/")
        )
        for prefix in list(prefixes)[:MAX_LAYER_PANELS]:
            columns = sorted(
                (c for c in run.history.columns if str(c).startswith(f"{prefix}/load/e")),
                key=lambda c: int(c.rsplit("/e", 1)[1]),
            )
            frame = run.history[columns].dropna(how="all")
            frame.columns = [c.rsplit("/", 1)[1] for c in columns]
            if not frame.empty:
                panels.append((f"{label}, {prefix.split('/', 1)[1]}, seed {run.seed}", frame))
    return panels


def router_load_figure(data: FigureData) -> str | None:
    """Each expert's share of the routed assignments over training, one seed per routing."""
    panels = router_load_panels(data)
    if not panels:
        return None
    return plots.plot_router_load(
        panels, data.path("router_load.png"), "Router load: share of routed assignments per expert"
    )


def curvature_densities(run: Run, prefix: str = "curvature") -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(step, grid, density)`` of every saved Hessian spectral density of ``run`` (``CurvatureMonitor`` writes
    ``curvature/step_<step>.json`` next to its CSV or TensorBoard log), by step, for the parameter set ``prefix``
    (``"curvature"``: the whole model)."""
    folders = [os.path.join(run.path, "curvature")]
    if run.geometry_dir is not None:
        folders.append(os.path.join(os.path.dirname(run.geometry_dir), "curvature"))
    found: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
    for path in (p for folder in dict.fromkeys(folders) for p in glob.glob(os.path.join(folder, "step_*.json"))):
        with open(path) as handle:
            payload = json.load(handle)
        density = payload.get("densities", {}).get(prefix)
        if density is not None:
            step = int(payload["step"])
            found[step] = (step, np.asarray(density["grid"], float), np.asarray(density["density"], float))
    return [found[step] for step in sorted(found)]


def curvature_density_panels(data: FigureData) -> list[tuple[str, list[tuple[int, np.ndarray, np.ndarray]]]]:
    """The whole-model Hessian spectral density at every saved step, one panel per routing (its first seed)."""
    panels = []
    for label, members in data.groups.items():
        series = next((s for s in (curvature_densities(run) for run in members) if s), None)
        if series:
            panels.append((f"{label}, seed {members[0].seed}", series))
    return panels


def curvature_density_figure(data: FigureData) -> str | None:
    """The whole-model Hessian spectral density at every saved step, one panel per routing (its first seed)."""
    panels = curvature_density_panels(data)
    if not panels:
        return None
    return plots.plot_density_panels(
        panels,
        data.path("curvature_density.png"),
        "Hessian spectral density of the training loss over training (stochastic Lanczos quadrature)",
    )


# (file name, figure, note when it has no data), in the order of the report.
FIGURES: tuple[tuple[str, Callable[[FigureData], str | None], str | None], ...] = (
    ("spectra.png", spectra_figure, "no run has geometry/step_*.json reports with Jacobian spectra"),
    ("curves.png", curves_figure, "no run logged geometry/<layer>/jac_sigma_max/mean"),
    ("alignment.png", alignment_figure, "no MoE run has an alignment matrix in its geometry reports"),
    ("pca_spectra.png", pca_figure, "no run has PCA eigenvalues in its geometry reports"),
    ("router_load.png", router_load_figure, "no MoE run logged router/<layer>/load/e<i> keys"),
    # Optional (None): CurvatureMonitor is off by default, so a report without densities leaves the figure out.
    ("curvature_density.png", curvature_density_figure, None),
)


def write_figures(
    runs: list[Run], out_dir: str, only: tuple[str, ...] | None = None
) -> tuple[dict[str, str | None], dict[str, str]]:
    """Write the figures of :data:`FIGURES` (an optional one only when it has data), or those named in ``only``.

    Returns:
        ``(images, notes)``: file name -> written path (None when skipped), and file name -> why it was skipped.
    """
    data = FigureData.of(runs, out_dir)
    images: dict[str, str | None] = {}
    notes: dict[str, str] = {}
    for name, figure, missing in FIGURES:
        if only is not None and name not in only:
            continue
        try:
            path = figure(data)
        except Exception as error:  # a figure must never stop the report; say why it is missing
            plots.plt.close("all")
            images[name], notes[name] = None, f"failed: {error!r}"
            continue
        if path is None and missing is None:
            continue  # an optional figure without data
        images[name] = path
        if path is None:
            notes[name] = missing
    return images, notes


def claim_groups(table: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]] | None:
    """The panels both renderings of the claims over training draw: ``(title, y label, rows)`` per claim row of
    :func:`~moe_lightning.analysis.claims.claims_over_training` (its title's line break is ``\\n``), or None when
    no step has a seed."""
    if table.empty or not (table["n seeds"] >= 1).any():
        return None
    multi_family = table["family"].nunique() > 1
    groups = []
    for (family, claim, comparison, metric), rows in table.groupby(
        ["family", "claim", "comparison", "metric"], sort=False
    ):
        prefix = f"{family}: " if multi_family else ""
        ylabel = "A − B" if rows["paired"].iloc[0] else "A − threshold"
        seeds = int(rows["n seeds"].max())
        groups.append((f"{prefix}{claim}: {comparison}\n{metric} (n ≤ {seeds} seeds)", ylabel, rows))
    return groups


def claims_over_training_figure(table: pd.DataFrame, path: str, level: float = LEVEL) -> str | None:
    """One panel per claim row of :func:`~moe_lightning.analysis.claims.claims_over_training`: the paired
    difference at every probe step with its t-interval (shaded) and bootstrap interval (bars), one line per layer;
    ``level`` is the coverage the table was computed at."""
    groups = claim_groups(table)
    if groups is None:
        return None
    panels = []
    for title, ylabel, rows in groups:
        series = {str(layer): frame for layer, frame in rows.groupby("layer", sort=False)}
        panels.append((title, ylabel, series))
    return plots.plot_claim_panels(
        panels,
        path,
        "Claims over training: the mean seed-paired difference at every probe step, with its intervals and the "
        "verdict at that step",
        level=level,
    )
