"""The dashboard of one run: interactive Plotly charts (zoom, hover) in one self-contained HTML page, with
Plotly's JavaScript inlined so that the page opens without a network.

Sections: the losses; every geometry quantity of each MoE layer over steps (small multiples, with its experts, its
token-level spread and its chance level); the spectrum of each layer at every saved probe (index × step, log
colour scale); the PCA eigenvalues at the last probe; the router load (experts × steps); the alignment and overlap
matrices at the first and the last probe; the curvature curves when ``CurvatureMonitor`` ran. Every chart sits in
a ``<div class="chart">`` whose ``data-kind`` and ``data-layer`` attributes say what it shows.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moe_lightning.analysis.experts import expert_mean_pca
from moe_lightning.analysis.overview import constant_value
from moe_lightning.analysis.run import Run
from moe_lightning.analysis.steps import GEOMETRY_METRICS
from moe_lightning.analysis.timeline import (
    STABILITY_THRESHOLDS,
    Quantity,
    SpectrumEvolution,
    curvature_curves,
    geometry_layers,
    layer_quantities,
    loss_curves,
    probe_matrices,
    router_load,
    saved_reports,
    spectrum_evolution,
)
from moe_lightning.report import html as page
from moe_lightning.report.charts import CHANCE_COLOR, EXPERT_COLORS, chart, small_multiples
from moe_lightning.report.format import format_number

# A quantity's axis title: its name in the results table where it has one, else its key.
Y_TITLES = {key.removesuffix("/mean"): title for key, title in GEOMETRY_METRICS}

DECADES = 6
LEGEND = (
    "Each panel is one quantity of the layer against the training step. Black: the layer's value, or the mean over "
    "its experts; thin coloured lines: the experts e0, e1, … (legend on the right; click a name to hide it in every "
    "panel); grey band: ± the token-level standard deviation logged with the quantity, where there is one; dashed "
    "red: the chance level (alignment: E|cos| of Gaussian matrices; subspace overlap: r/d; ratios: 1). A single "
    "probe is drawn as points. Drag to zoom, double-click to reset."
)


def _line(series: pd.Series, name: str, **style) -> go.Scatter:
    return go.Scatter(x=series.index, y=series.values, name=name, mode="lines", **style)


def _quantity_traces(quantity: Quantity) -> list[go.Scatter]:
    traces = []
    if quantity.spread is not None:
        spread = quantity.spread.reindex(quantity.value.index)
        band = {"mode": "lines", "line": {"width": 0}, "hoverinfo": "skip"}
        traces.append(go.Scatter(x=quantity.value.index, y=quantity.value + spread, showlegend=False, **band))
        traces.append(
            go.Scatter(
                x=quantity.value.index,
                y=quantity.value - spread,
                fill="tonexty",
                fillcolor="rgba(0,0,0,0.12)",
                name="± token-level std",
                **band,
            )
        )
    for index, (expert, series) in enumerate(quantity.experts.items()):
        color = EXPERT_COLORS[index % len(EXPERT_COLORS)]
        traces.append(_line(series, expert, line={"width": 1, "color": color}, opacity=0.7))
    traces.append(_line(quantity.value, "mean" if quantity.experts else "value", line={"width": 2, "color": "black"}))
    if quantity.chance is not None:
        traces.append(_line(quantity.chance, "chance", line={"width": 1.5, "color": CHANCE_COLOR, "dash": "dash"}))
    for trace in traces:
        if trace.x is not None and len(trace.x) == 1 and trace.hoverinfo != "skip":
            trace.mode = "markers"  # a single probe is a point, not an invisible line
    return traces


def _note(text: str) -> str:
    return page.paragraph(text, "note")


def _constants(constant: dict[str, float], layer: str = "") -> str:
    """The one line that lists the series left out because they never changed."""
    if not constant:
        return ""
    listed = ", ".join(f"{name} = {format_number(value)}" for name, value in constant.items())
    text = f"Constant over the run, not drawn (the value, or the mean over experts that are constant too): {listed}."
    return f'<p class="constants" data-layer="{html.escape(layer)}">{html.escape(text)}</p>'


def _losses(run: Run) -> str:
    curves = loss_curves(run.history)
    if not curves:
        return _note("no train/… or val/… key was logged")
    constant = {key: v for key, series in curves.items() if (v := constant_value(series)) is not None}
    panels = [
        (key, key.split("/", 1)[-1], [_line(series, key, line={"width": 1.5, "color": "black"}, showlegend=False)])
        for key, series in curves.items()
        if key not in constant
    ]
    return (small_multiples(panels, "loss") if panels else "") + _constants(constant)


def _geometry(run: Run, layers: list[str]) -> str:
    if not layers:
        return _note("no geometry/<layer>/… key was logged (is GeometryMonitor among the callbacks?)")
    parts = [page.paragraph(LEGEND, "caption")]
    for layer in layers:
        quantities = layer_quantities(run.history, layer)
        constant = {q.name: v for q in quantities if (v := constant_value(q.value, *q.experts.values())) is not None}
        panels = [
            (q.name, Y_TITLES.get(q.name, q.name), _quantity_traces(q)) for q in quantities if q.name not in constant
        ]
        parts.append(f"<h3>{html.escape(layer)}</h3>")
        if panels:
            parts.append(small_multiples(panels, "geometry", layer))
        parts.append(_constants(constant, layer))
    return "\n".join(parts)


def _log_scale(logs: np.ndarray) -> dict:
    """Colour range and decade ticks of log10 values, at most :data:`DECADES` decades below the largest (a
    rank-deficient Jacobian's zero singular values sit near 1e-16 and would flatten the rest)."""
    finite = logs[np.isfinite(logs)]
    high = math.ceil(finite.max()) if finite.size else 1
    low = max(math.floor(finite.min()), high - DECADES) if finite.size else 0
    ticks = list(range(low, high + 1))
    return {"zmin": low, "zmax": high, "colorbar": {"tickvals": ticks, "ticktext": [f"1e{t}" for t in ticks]}}


def _log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(values), np.nan)


def _spectrum_panels(items: list[SpectrumEvolution]) -> list[tuple[str, np.ndarray, np.ndarray, dict]]:
    """``(title, log10 values, hover values, colour settings)``: each spectrum on a log colour scale, then the
    first one relative to its first probe (log10 σ_i(t)/σ_i(t₀), diverging around no change)."""
    panels = []
    for evolution in items:
        logs = _log10(evolution.values_MS)
        panels.append((evolution.title, logs, evolution.values_MS, {"colorscale": "Viridis", **_log_scale(logs)}))
    first = items[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = first.values_MS / first.values_MS[:, :1]
    change = _log10(ratio)
    finite = np.abs(change[np.isfinite(change)])
    bound = max(float(finite.max()), 1e-3) if finite.size else 1.0
    title = f"{first.title}: σ_i / σ_i at step {first.steps[0]}"
    diverging = {"colorscale": "RdBu_r", "zmid": 0.0, "zmin": -bound, "zmax": bound, "colorbar": {}}
    panels.append((title, change, ratio, diverging))
    return panels


def _spectra(reports: list) -> str:
    evolutions = spectrum_evolution(reports)
    if not evolutions:
        return _note("no saved geometry/step_*.json report holds a Jacobian spectrum")
    parts = [
        page.paragraph(
            "Singular values σ_i of the mean Jacobian at every saved probe (colour: log10 σ_i, at most "
            f"{DECADES} decades below the largest), and the expert mean's change since the first probe (log10 of "
            "the ratio; red: grown, blue: shrunk). Hover for the values.",
            "caption",
        )
    ]
    for layer, items in evolutions.items():
        panels = _spectrum_panels(items)
        figure = make_subplots(
            rows=1, cols=len(panels), subplot_titles=[title for title, *_ in panels], horizontal_spacing=0.12
        )
        steps = [str(s) for s in items[0].steps]
        for index, (_, logs, values, colours) in enumerate(panels):
            right = figure.get_subplot(1, index + 1).xaxis.domain[1]
            colours["colorbar"].update(x=right + 0.005, xanchor="left", len=0.9, thickness=12, title={"text": "log10"})
            figure.add_trace(
                go.Heatmap(
                    z=logs,
                    x=steps if index == len(panels) - 1 else [str(s) for s in items[index].steps],
                    y=np.arange(1, logs.shape[0] + 1),
                    customdata=values,
                    hovertemplate="step %{x}<br>i = %{y}: %{customdata:.4g}<extra></extra>",
                    **colours,
                ),
                row=1,
                col=index + 1,
            )
            figure.update_xaxes(title_text="probe step", type="category", row=1, col=index + 1)
            figure.update_yaxes(title_text="index i", row=1, col=index + 1)
        figure.update_layout(height=360, margin={"l": 55, "r": 20, "t": 40, "b": 45}, template="plotly_white")
        figure.update_annotations(font_size=12)
        parts.append(f"<h3>{html.escape(layer)}</h3>" + chart(figure, "spectrum", layer))
    return "\n".join(parts)


def _pca(reports: list) -> str:
    """The weighted PCA eigenvalues of every site at the last probe, per layer: each expert and their Σw-weighted
    mean, log scale."""
    if not reports:
        return _note("no saved geometry/step_*.json report")
    step, layers = reports[-1]
    parts = []
    for layer, report in layers.items():
        panels = []
        for site, results in report.pca.items():
            experts = [(f"e{e}", r.eigenvalues.double().numpy()) for e, r in enumerate(results)]
            experts = [(name, values) for name, values in experts if values.size]
            mean = expert_mean_pca(report, site)
            if not experts or mean is None:
                continue
            traces = [
                go.Scatter(
                    x=np.arange(1, v.size + 1),
                    y=v,
                    name=name,
                    mode="lines",
                    opacity=0.7,
                    line={"width": 1, "color": EXPERT_COLORS[i % len(EXPERT_COLORS)]},
                )
                for i, (name, v) in enumerate(experts)
            ]
            traces.append(
                go.Scatter(
                    x=np.arange(1, mean.size + 1),
                    y=mean,
                    name="mean",
                    mode="lines",
                    line={"width": 2, "color": "black"},
                )
            )
            panels.append((f"{site} site", "eigenvalue λ_k", traces))
        if panels:
            body = small_multiples(panels, "pca", layer, x_title="component k", log_y=True)
            parts.append(f"<h3>{html.escape(layer)}</h3>" + body)
    if not parts:
        return _note("no saved report holds PCA eigenvalues")
    caption = f"Eigenvalues λ_k of the weighted covariance at step {step} (black: the Σw-weighted expert mean)."
    return page.paragraph(caption, "caption") + "\n".join(parts)


def _router(run: Run) -> str:
    loads = router_load(run.history)
    if not loads:
        return _note("no router/<layer>/load/e<i> key was logged (is RouterMonitor among the callbacks?)")
    parts = []
    for layer, frame in loads.items():
        figure = go.Figure(
            go.Heatmap(
                z=frame.to_numpy().T,
                x=frame.index,
                y=list(frame.columns),
                colorscale="Viridis",
                zmin=0.0,
                colorbar={"title": {"text": "share"}},
                hovertemplate="step %{x}<br>%{y}: %{z:.3f}<extra></extra>",
            )
        )
        figure.update_layout(
            title={"text": f"{layer}: share of routed assignments (uniform 1/E = {1 / frame.shape[1]:.3g})"},
            xaxis_title="training step",
            yaxis_title="expert",
            height=max(260, 22 * frame.shape[1] + 140),
            margin={"l": 55, "r": 20, "t": 45, "b": 45},
            template="plotly_white",
        )
        parts.append(chart(figure, "router", layer))
    return "\n".join(parts)


def _matrices(reports: list) -> str:
    found = probe_matrices(reports)
    if not found:
        return _note("no saved report holds an alignment or overlap matrix (a dense layer has none)")
    parts = [page.paragraph("|cos| alignments and subspace overlaps between experts i and j, in [0, 1].", "caption")]
    for layer, items in found.items():
        keys = list(dict.fromkeys(key for key, _, _ in items))
        steps = list(dict.fromkeys(step for _, step, _ in items))
        titles = [f"{key}, step {step}" for step in steps for key in keys]
        figure = make_subplots(
            rows=len(steps), cols=len(keys), subplot_titles=titles, vertical_spacing=0.15, horizontal_spacing=0.06
        )
        for key, step, matrix in items:
            figure.add_trace(
                go.Heatmap(
                    z=matrix,
                    coloraxis="coloraxis",
                    hovertemplate="e%{y} · e%{x}: %{z:.3f}<extra></extra>",
                ),
                row=steps.index(step) + 1,
                col=keys.index(key) + 1,
            )
        figure.update_yaxes(autorange="reversed", title_text="expert i", title_font_size=10)
        figure.update_xaxes(title_text="expert j", title_font_size=10)
        figure.update_layout(
            coloraxis={"colorscale": "Viridis", "cmin": 0.0, "cmax": 1.0, "colorbar": {"title": {"text": "value"}}},
            height=300 * len(steps) + 60,
            margin={"l": 40, "r": 20, "t": 45, "b": 30},
            template="plotly_white",
        )
        figure.update_annotations(font_size=11)
        parts.append(f"<h3>{html.escape(layer)}</h3>" + chart(figure, "matrices", layer))
    return "\n".join(parts)


def _curvature(run: Run) -> str | None:
    panels = curvature_curves(run.history)
    if not panels:
        return None
    traces, stability = [], []
    for title, lines in panels.items():
        styled = [
            _line(series, name, line={"width": 1.5, "color": EXPERT_COLORS[i % len(EXPERT_COLORS)]})
            for i, (name, series) in enumerate(lines.items())
        ]
        for trace in styled:
            trace.mode = "lines+markers"
            trace.showlegend = len(styled) > 1  # a panel's one line is named by its title
        name = title.removeprefix("curvature/")
        # A sharpness beside its edge-of-stability threshold: far below it early on (the threshold falls as the
        # learning rate warms up), so on a log axis, where both stay readable.
        (stability if set(lines) & set(STABILITY_THRESHOLDS) else traces).append((name, name, styled))
    html_parts = [small_multiples(traces, "curvature")] if traces else []
    if stability:
        html_parts.append("<h3>Sharpness against the edge of stability</h3>")
        html_parts.append(small_multiples(stability, "curvature", "stability", log_y=True))
    return "\n".join(html_parts)


def dashboard_sections(run: Run) -> list[tuple[str, str]]:
    """The ``(heading, HTML)`` sections of the run's dashboard (the page needs
    :func:`~moe_lightning.report.charts.plotly_script` in its head)."""
    if run.history is None:
        return [("Dashboard", _note(f"the run's history could not be read: {run.note}"))]
    layers = geometry_layers(run)
    reports = saved_reports(run)
    sections = [
        ("Losses", _losses(run)),
        ("Geometry over training", _geometry(run, layers)),
        ("Spectrum over training", _spectra(reports)),
        ("PCA eigenvalues at the last probe", _pca(reports)),
        ("Router load", _router(run)),
        ("Alignment and overlap at the first and the last probe", _matrices(reports)),
    ]
    curvature = _curvature(run)
    if curvature is not None:
        sections.append(("Curvature", curvature))
    return sections
