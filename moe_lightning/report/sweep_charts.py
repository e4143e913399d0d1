"""The interactive figures of the report of several runs: the same data as its PNGs
(:mod:`moe_lightning.report.figures`), drawn with Plotly, each under a heading that says what it shows."""

from __future__ import annotations

import html
from collections.abc import Callable

import pandas as pd
import plotly.graph_objects as go

from moe_lightning.analysis.decision import LEVEL
from moe_lightning.analysis.run import Run
from moe_lightning.report import charts, figures
from moe_lightning.report import html as page
from moe_lightning.report.format import format_level
from moe_lightning.report.plots import VERDICT_COLORS

# The matplotlib names of plots.VERDICT_COLORS, as Plotly colours.
_VERDICT_HEX = {"tab:green": "#2ca02c", "tab:red": "#d62728", "0.6": "#999999"}

# File name of the PNG -> (heading, caption): what the figure shows.
TITLES = {
    "spectra.png": (
        "Expert-Jacobian spectrum at the final probe",
        "Singular values σ_i of the experts' mean Jacobian (experts weighted by their gate mass Σw) against the "
        "index i, log-log, one panel per layer: the mean over seeds, the band the min–max over seeds.",
    ),
    "curves.png": (
        "σ_max and Jacobian effective rank over training",
        "Expert means, averaged over the layers, against the training step: the mean over seeds, the band the "
        "min–max over seeds.",
    ),
    "alignment.png": (
        "Mean-Jacobian alignment between experts at the final probe",
        "|cos(J̄_i, J̄_j)| for each routing and layer (lowest seed), with the off-diagonal mean and the chance level "
        "(E|cos| of Gaussian matrices) in each title.",
    ),
    "pca_spectra.png": (
        "PCA eigenvalues of the routed tokens at the final probe",
        "Eigenvalues λ_k of the weighted covariance at the hidden and the input site (expert mean, Σw-weighted), "
        "log-log: the mean over seeds, the band the min–max over seeds.",
    ),
    "router_load.png": (
        "Router load over training",
        "Each expert's share of the routed assignments (soft routing: of the gate mass) against the training step, "
        "one panel per routing and layer (lowest seed); dashed: the uniform share 1/E.",
    ),
    "curvature_density.png": (
        "Hessian spectral density over training",
        "The whole model's Hessian spectral density (stochastic Lanczos quadrature) at every saved step, one panel "
        "per routing (lowest seed); dark: early, light: late.",
    ),
    "claims_over_training.png": (
        "Claims over training",
        "Each claim's seed-paired difference at every probe step (line), its t-interval over seeds (band), and the "
        "verdict at that step (marker: green holds, red does not hold, grey inconclusive; hollow: rests on an "
        "under-sampled PCA value). Dashed: zero.",
    ),
}

_DRAW: dict[str, Callable[[figures.FigureData], str | None]] = {
    "spectra.png": lambda d: (p := figures.spectra_panels(d)) and charts.spectrum_chart(p, "spectra", "σ_i"),
    "curves.png": lambda d: (p := figures.curves_panels(d)) and charts.curve_chart(p, "curves"),
    "alignment.png": lambda d: (i := figures.alignment_items(d)) and charts.heatmap_chart(i, "alignment"),
    "pca_spectra.png": lambda d: (
        (p := figures.pca_panels(d)) and charts.spectrum_chart(p, "pca", "eigenvalue λ_k", x_title="component k")
    ),
    "router_load.png": lambda d: (p := figures.router_load_panels(d)) and charts.router_load_chart(p, "router"),
    "curvature_density.png": lambda d: (
        (p := figures.curvature_density_panels(d)) and charts.density_chart(p, "curvature")
    ),
}


def _section(name: str, body: str) -> str:
    heading, caption = TITLES[name]
    return f"<h3>{html.escape(heading)}</h3>" + page.paragraph(caption, "caption") + body


def claims_chart(table: pd.DataFrame, level: float = LEVEL) -> str | None:
    """:func:`~moe_lightning.report.plots.plot_claim_panels` as a chart, from the table of
    :func:`~moe_lightning.analysis.claims.claims_over_training`."""
    groups = figures.claim_groups(table)
    if groups is None:
        return None
    panels = []
    for title, ylabel, rows in groups:
        traces: list[go.Scatter] = []
        layers = list(rows.groupby("layer", sort=False))
        for index, (layer, frame) in enumerate(layers):
            frame = frame.sort_values("step")
            color = charts.EXPERT_COLORS[index % len(charts.EXPERT_COLORS)]
            name = str(layer) if len(layers) > 1 else "mean difference"
            traces += charts.band(
                frame["step"], frame["ci_low"], frame["ci_high"], color, f"{format_level(level)} t-interval"
            )
            traces.append(go.Scatter(x=frame["step"], y=frame["mean_difference"], name=name, line={"color": color}))
            for verdict, mpl_color in VERDICT_COLORS.items():
                colour = _VERDICT_HEX.get(mpl_color, mpl_color)
                for hollow in (False, True):
                    chosen = frame[(frame["verdict"] == verdict) & (frame["undersampled"].astype(bool) == hollow)]
                    if len(chosen):
                        edge = {"color": colour, "width": 2}
                        marker = {"size": 8, "color": "white" if hollow else colour, "line": edge}
                        label = f"{verdict} (n_eff < D)" if hollow else verdict
                        traces.append(
                            go.Scatter(
                                x=chosen["step"], y=chosen["mean_difference"], mode="markers", marker=marker, name=label
                            )
                        )
        steps = sorted(rows["step"].unique())
        zero = {"color": "black", "dash": "dash", "width": 1}
        traces.append(go.Scatter(x=steps, y=[0.0] * len(steps), name="zero", mode="lines", line=zero, hoverinfo="skip"))
        panels.append((title.replace("\n", "<br>"), ylabel, traces))
    return charts.small_multiples(panels, "claims", columns=3)


def interactive_figures(runs: list[Run], training: pd.DataFrame | None) -> str:
    """Every figure of the report as an interactive chart under its heading, or the note saying why it is missing
    (an optional figure without data, the Hessian density, is left out)."""
    data = figures.FigureData.of(runs, "")
    parts = []
    for name, _figure, missing in figures.FIGURES:
        try:
            body = _DRAW[name](data)
        except Exception as error:  # a figure must never stop the report; say why it is missing
            body, missing = None, f"failed: {error!r}"
        if body:
            parts.append(_section(name, body))
        elif missing is not None:
            parts.append(_section(name, page.paragraph(f"not drawn: {missing}", "note")))
    if training is not None:
        body = claims_chart(training)
        note = page.paragraph("not drawn: no claim has a paired seed at any probe step", "note")
        parts.append(_section("claims_over_training.png", body or note))
    return "\n".join(parts)
