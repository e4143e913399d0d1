"""The page of one probed model (``render_probe``): one pretrained checkpoint probed once, one row per MoE layer
(no routings, no seeds); the numbers are :mod:`moe_lightning.analysis.experts`."""

from __future__ import annotations

import html
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from moe_lightning.analysis.experts import (
    alignment_and_subspaces,
    expert_mean_pca,
    expert_mean_spectrum,
    layer_metrics,
)
from moe_lightning.analysis.steps import GEOMETRY_METRICS
from moe_lightning.report import charts, plots
from moe_lightning.report import html as page
from moe_lightning.report.format import format_number, markdown_table

# The PCA sites the figures show (a subset of moe_lightning.geometry.probe.PCA_SITES).
PLOTTED_PCA_SITES = ("hidden", "input")
# File name of each figure -> (heading, caption) of its chart on the page.
PROBE_TITLES = {
    "spectra.png": (
        "Expert-Jacobian spectrum of each layer",
        "Singular values σ_i of the experts' mean Jacobian (experts weighted by their gate mass Σw) against the "
        "index i, log-log, one line per layer.",
    ),
    "alignment.png": (
        "Mean-Jacobian alignment between experts",
        "|cos(J̄_i, J̄_j)| between the experts' mean Jacobians of each layer, with the off-diagonal mean and the "
        "chance level (E|cos| of Gaussian matrices) in each title.",
    ),
    "pca_spectra.png": (
        "PCA eigenvalues of the routed tokens",
        "Eigenvalues λ_k of the weighted covariance at the hidden and the input site (expert mean, Σw-weighted), "
        "log-log, one line per layer.",
    ),
}


# The columns of the page's alignment-and-subspaces table: heading -> the value's path in alignment_and_subspaces().
PAPER_COLUMNS = {
    "E": ("num_experts",),
    "alignment, mean off-diag": ("alignment", "mean_offdiag"),
    "alignment chance": ("alignment", "chance"),
    "alignment / chance": ("alignment", "ratio"),
    "functional overlap, mean off-diag": ("subspace_overlap", "functional", "mean_offdiag"),
    "representational overlap, mean off-diag": ("subspace_overlap", "representational", "mean_offdiag"),
    "overlap chance (r/d)": ("subspace_overlap", "chance"),
    "subspace rank r": ("subspace_overlap", "rank"),
}
PAPER_CAPTION = (
    "Per layer: the alignment |cos(J̄_i, J̄_j)| of the experts' mean Jacobians against its chance level (E|cos| of "
    "Gaussian matrices), and the overlaps (mean cos² of the principal angles) of the experts' rank-r functional "
    "subspaces (top right singular vectors of J̄_e) and representational subspaces (top eigenvectors of their "
    "routed tokens' covariance) against theirs, r/d. The heatmaps show the E×E matrices, one row of three per "
    "layer; n/a where the probe does not compute a value (the alignment and the functional subspaces need whole "
    "mean Jacobians, which the matrix-free path does not form)."
)


def alignment_title(label: str, report: Any) -> str:
    """Heatmap title with the off-diagonal mean and the chance level."""
    mean = report.layer.get("align_mean_offdiag", math.nan)
    chance = report.layer.get("align_chance", math.nan)
    return f"{label}\noff-diag mean {format_number(mean)}, chance {format_number(chance)}"


def render_probe(layers: dict[str, Any], out_dir: str, title: str) -> list[str]:
    """Write the report of one probed model: ``probe.md``, ``probe.csv``, ``spectra.png``, ``alignment.png``,
    ``pca_spectra.png`` and a self-contained ``index.html``.

    Args:
        layers: layer name -> :class:`~moe_lightning.geometry.GeometryReport` (e.g. from ``probe()`` on every
            view of ``find_moe_layers(model)``).
        out_dir: output directory (created if needed).
        title: page and table title (e.g. the checkpoint name).

    Returns:
        The paths written, in the order above (a figure without data is skipped, with a note in the HTML).

    Raises:
        ValueError: ``layers`` is empty.
    """
    if not layers:
        raise ValueError("render_probe: layers is empty; expected {layer name: GeometryReport} with at least one layer")
    os.makedirs(out_dir, exist_ok=True)
    display, written = _write_tables(layers, out_dir, title)
    images, notes = _probe_figures(layers, out_dir, title)
    written += [p for p in images.values() if p is not None]
    sections = [
        ("Layers", page.split_tables(display.copy(), ["layer"], per_table=6)),
        ("Alignment and subspaces", _alignment_and_subspaces(layers)),
        ("Figures", _charts(layers, notes)),
    ]
    path = os.path.join(out_dir, "index.html")
    written.append(page.write_page(path, title, sections, head=charts.plotly_script(), contents=True))
    return written


def _value(outputs: dict[str, Any], path: tuple[str, ...]) -> float:
    """The value at ``path`` in :func:`alignment_and_subspaces`'s dict; NaN where a part of it is None."""
    value: Any = outputs
    for key in path:
        if value is None:
            return math.nan
        value = value[key]
    return math.nan if value is None else float(value)


def _alignment_and_subspaces(layers: dict[str, Any]) -> str:
    """The second paper's outputs of each layer: a table of the summaries against chance, then the alignment, the
    functional and the representational overlap matrices of each layer side by side."""
    outputs = {name: found for name, r in layers.items() if (found := alignment_and_subspaces(r)) is not None}
    if not outputs:
        return page.paragraph("not shown: no layer with more than one expert and an alignment or subspaces", "note")
    table = pd.DataFrame(
        [
            {"layer": name, **{heading: format_number(_value(o, path)) for heading, path in PAPER_COLUMNS.items()}}
            for name, o in outputs.items()
        ]
    )
    heatmaps = []
    for name, o in outputs.items():
        size = o["num_experts"]
        missing = [[math.nan] * size for _ in range(size)]
        alignment, subspaces = o["alignment"] or {}, o["subspace_overlap"] or {}
        chance = format_number(_value(o, ("alignment", "chance")))
        heatmaps.append((f"{name}\nalignment |cos|, chance {chance}", alignment.get("matrix", missing)))
        overlap_chance = format_number(_value(o, ("subspace_overlap", "chance")))
        for kind in ("functional", "representational"):
            matrix = (subspaces.get(kind) or {}).get("matrix", missing)
            heatmaps.append((f"{name}\n{kind} overlap, chance {overlap_chance}", matrix))
    chart = charts.heatmap_chart(
        [(title, np.asarray(matrix, dtype=float)) for title, matrix in heatmaps],
        "subspaces",
        colorbar="|cos| or overlap",
        columns=3,
    )
    return page.paragraph(PAPER_CAPTION, "caption") + page.table_html(table) + chart


def _charts(layers: dict[str, Any], notes: dict[str, str]) -> str:
    """The page's interactive charts of the figures' data, each under a heading that says what it shows, or the
    note saying why it is missing."""
    spectra = {name: [s] for name, r in layers.items() if (s := expert_mean_spectrum(r)) is not None}
    heatmaps = [
        (alignment_title(name, r), r.matrices["align_mean_jacobian"].double().numpy())
        for name, r in layers.items()
        if r.num_experts > 1 and "align_mean_jacobian" in r.matrices
    ]
    pca = [
        (f"{site} site", series)
        for site in PLOTTED_PCA_SITES
        if (series := {name: [v] for name, r in layers.items() if (v := expert_mean_pca(r, site)) is not None})
    ]
    drawn = {
        "spectra.png": spectra and charts.spectrum_chart([("expert mean", spectra)], "spectra", "σ_i"),
        "alignment.png": heatmaps and charts.heatmap_chart(heatmaps, "alignment"),
        "pca_spectra.png": pca and charts.spectrum_chart(pca, "pca", "eigenvalue λ_k", x_title="component k"),
    }
    parts = []
    for name, body in drawn.items():
        heading, caption = PROBE_TITLES[name]
        note = page.paragraph(f"not drawn: {notes.get(name, 'no data')}", "note")
        parts.append(f"<h3>{html.escape(heading)}</h3>" + page.paragraph(caption, "caption") + (body or note))
    return "\n".join(parts)


def _write_tables(layers: dict[str, Any], out_dir: str, title: str) -> tuple[pd.DataFrame, list[str]]:
    """Write ``probe.md`` and ``probe.csv``; return the formatted table (for the HTML page) and the two paths."""
    table = layer_metrics(layers)
    csv_path = os.path.join(out_dir, "probe.csv")
    table.to_csv(csv_path, index=False)
    display = table.copy()
    for column in display.columns[3:]:
        display[column] = [format_number(v) for v in display[column]]
    display.columns = ["layer", "E", "tokens", *[f"{t} [{k}]" for k, t in GEOMETRY_METRICS]]
    md_path = os.path.join(out_dir, "probe.md")
    with open(md_path, "w") as handle:
        handle.write(
            f"# {title}\n\nGeometry of each MoE layer, probed once (docs/geometry.md definitions; `/mean` = mean over "
            "the layer's experts; n/a = not computed for this layer, e.g. alignment of a dense layer).\n\n"
        )
        handle.write(markdown_table(display) + "\n")
    return display, [md_path, csv_path]


def _probe_figures(layers: dict[str, Any], out_dir: str, title: str) -> tuple[dict[str, str | None], dict[str, str]]:
    """Write ``spectra.png``, ``alignment.png`` and ``pca_spectra.png``; a figure without data gets a note."""
    images: dict[str, str | None] = {}
    notes: dict[str, str] = {}
    spectra = {name: s for name, r in layers.items() if (s := expert_mean_spectrum(r)) is not None}
    if spectra:
        images["spectra.png"] = plots.plot_spectrum_panels(
            [("expert mean, weighted by gate mass Σw", {name: [s] for name, s in spectra.items()})],
            os.path.join(out_dir, "spectra.png"),
            f"{title}: mean expert-Jacobian singular values",
            ylabel="singular value σ_i",
        )
    else:
        images["spectra.png"], notes["spectra.png"] = None, "no Jacobian spectra in the reports"
    heatmaps = [
        (alignment_title(name, r), r.matrices["align_mean_jacobian"].double().numpy())
        for name, r in layers.items()
        if r.num_experts > 1 and "align_mean_jacobian" in r.matrices
    ]
    if heatmaps:
        images["alignment.png"] = plots.plot_heatmaps(
            heatmaps, os.path.join(out_dir, "alignment.png"), f"{title}: mean-Jacobian alignment |cos|"
        )
    else:
        images["alignment.png"], notes["alignment.png"] = None, "no layer with more than one expert and an alignment"
    pca_panels = []
    for site in PLOTTED_PCA_SITES:
        series = {name: [v] for name, r in layers.items() if (v := expert_mean_pca(r, site)) is not None}
        if series:
            pca_panels.append((f"{site} site (expert mean, weighted by Σw)", series))
    if pca_panels:
        images["pca_spectra.png"] = plots.plot_spectrum_panels(
            pca_panels,
            os.path.join(out_dir, "pca_spectra.png"),
            f"{title}: weighted PCA eigenvalues",
            ylabel="eigenvalue λ_k",
            xlabel="component k",
        )
    else:
        images["pca_spectra.png"], notes["pca_spectra.png"] = None, "no PCA eigenvalues in the reports"
    return images, notes
