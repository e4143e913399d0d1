"""Interactive Plotly charts for the report's pages (the run dashboard, the sweep report, the probed model), each in
a ``<div class="chart">`` whose ``data-kind`` and ``data-layer`` say what it shows. Plotly's JavaScript is inlined
once per page (:func:`plotly_script`), so a page opens without a network.

Every chart labels its axes, and a chart with more than one line has a legend (one entry per name, shared by its
panels); the page sizes the charts to its width (no horizontal scrolling).

The sweep and probe charts take the same panels as the matplotlib figures of :mod:`moe_lightning.report.plots`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from moe_lightning.analysis.results import seed_frames, seed_stacks

COLUMNS = 4
ROW_PX = 230
EXPERT_COLORS = qualitative.Dark24
CHANCE_COLOR = "crimson"
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
# A routing's colour, as in the PNG figures (plots.ROUTING_COLORS): dense grey, top-k blue, soft orange.
ROUTING_COLORS = {
    "dense": "#404040",
    "dense_total": "#404040",
    "dense_active": "#9467bd",
    "topk": "#1f77b4",
    "soft": "#ff7f0e",
}
TITLE_FONT = 12
AXIS_FONT = 10


def plotly_script() -> str:
    """Plotly's JavaScript, inlined once in the page's ``<head>``."""
    return f"<script>{get_plotlyjs()}</script>"


def chart(figure: go.Figure, kind: str, layer: str = "") -> str:
    """The figure as a ``<div class="chart">``, sized to the page's width."""
    figure.update_layout(autosize=True)
    body = figure.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG, default_width="100%")
    return f'<div class="chart" data-kind="{kind}" data-layer="{html.escape(layer)}">{body}</div>'


def color_for(label: str, index: int) -> str:
    """A routing's fixed colour (``family:routing`` too), else the expert palette."""
    for routing, color in ROUTING_COLORS.items():
        if label == routing or label.endswith(f":{routing}"):
            return color
    return EXPERT_COLORS[index % len(EXPERT_COLORS)]


def grid(titles: list[str], columns: int = COLUMNS, row_px: int = ROW_PX) -> go.Figure:
    """Small multiples: one subplot per title, ``columns`` to a row, a legend on the right."""
    columns = max(1, min(columns, len(titles)))
    rows = max(1, math.ceil(len(titles) / columns))
    height = rows * row_px + 70
    figure = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=titles,
        horizontal_spacing=0.07 if columns > 2 else 0.1,
        vertical_spacing=min(0.3, 80 / height) if rows > 1 else 0.1,
    )
    figure.update_layout(
        height=height,
        margin={"l": 55, "r": 15, "t": 50, "b": 45},
        template="plotly_white",
        legend={"font": {"size": AXIS_FONT}, "tracegroupgap": 2},
        hovermode="closest",
    )
    figure.update_annotations(font_size=TITLE_FONT)
    return figure


def label_axes(figure: go.Figure, x_title: str, y_titles: Sequence[str], columns: int) -> None:
    """Each subplot's axis titles: ``x_title`` below, its own entry of ``y_titles`` on the left."""
    for index, y_title in enumerate(y_titles):
        row, column = divmod(index, columns)
        figure.update_xaxes(title_text=x_title, title_standoff=4, row=row + 1, col=column + 1)
        figure.update_yaxes(title_text=y_title, title_standoff=2, row=row + 1, col=column + 1)
    figure.update_xaxes(title_font_size=AXIS_FONT, tickfont_size=AXIS_FONT - 1)
    figure.update_yaxes(title_font_size=AXIS_FONT, tickfont_size=AXIS_FONT - 1)


def one_legend_entry(traces: Sequence[go.Scatter]) -> None:
    """One legend entry per trace name over all panels (clicking it toggles that name everywhere); unnamed traces
    stay out of the legend."""
    seen: set[str] = set()
    for trace in traces:
        name = trace.name
        if not name or trace.showlegend is False:
            trace.showlegend = False
            continue
        trace.legendgroup = name
        trace.showlegend = name not in seen
        seen.add(name)


def place(figure: go.Figure, panels: Sequence[Sequence[go.BaseTraceType]], columns: int) -> None:
    """Add each panel's traces to its subplot, in one call (adding traces one by one re-validates the figure)."""
    placed = [(trace, *divmod(index, columns)) for index, traces in enumerate(panels) for trace in traces]
    one_legend_entry([trace for trace, _, _ in placed])
    figure.add_traces(
        [trace for trace, _, _ in placed],
        rows=[row + 1 for _, row, _ in placed],
        cols=[column + 1 for _, _, column in placed],
    )


def small_multiples(
    panels: Sequence[tuple[str, str, Sequence[go.BaseTraceType]]],
    kind: str,
    layer: str = "",
    x_title: str = "training step",
    log_y: bool = False,
    log_x: bool = False,
    columns: int = COLUMNS,
) -> str:
    """``(title, y title, traces)`` panels in a grid, as a chart."""
    figure = grid([title for title, _, _ in panels], columns)
    columns = max(1, min(columns, len(panels)))
    place(figure, [traces for _, _, traces in panels], columns)
    label_axes(figure, x_title, [y for _, y, _ in panels], columns)
    if log_y:
        figure.update_yaxes(type="log", exponentformat="power")
    else:
        figure.update_yaxes(tickformat=".4~g")
    if log_x:
        figure.update_xaxes(type="log")
    return chart(figure, kind, layer)


def band(x, low, high, color: str, name: str, opacity: float = 0.2) -> list[go.Scatter]:
    """A shaded band between ``low`` and ``high`` (two traces; the second, filled, carries the legend entry)."""
    edge = {"mode": "lines", "line": {"width": 0}, "hoverinfo": "skip"}
    fill = f"rgba{(*_rgb(color), opacity)}"
    return [
        go.Scatter(x=x, y=high, showlegend=False, **edge),
        go.Scatter(x=x, y=low, fill="tonexty", fillcolor=fill, name=name, **edge),
    ]


def _rgb(color: str) -> tuple[int, int, int]:
    if color.startswith("#"):
        return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    if color.startswith("rgb"):
        return tuple(int(float(v)) for v in color[color.index("(") + 1 : -1].split(",")[:3])  # type: ignore[return-value]
    return (0, 0, 0)


def seed_lines(series: dict[str, list[np.ndarray]], start: int = 1) -> list[go.Scatter]:
    """Per label, the mean of its seeds' vectors (cut to the shortest) and, with several seeds, the min–max band."""
    traces: list[go.Scatter] = []
    for index, label, stack in seed_stacks(series):
        x = np.arange(start, start + stack.shape[1])
        color = color_for(label, index)
        seeds = f" ({stack.shape[0]} seeds)" if stack.shape[0] > 1 else ""
        if stack.shape[0] > 1:
            traces += band(x, np.nanmin(stack, axis=0), np.nanmax(stack, axis=0), color, f"{label}: min–max")
        traces.append(
            go.Scatter(x=x, y=np.nanmean(stack, axis=0), name=f"{label}{seeds}", mode="lines", line={"color": color})
        )
    return traces


def spectrum_chart(
    panels: Sequence[tuple[str, dict[str, list[np.ndarray]]]],
    kind: str,
    y_title: str,
    x_title: str = "index i",
    log_x: bool = True,
) -> str:
    """:func:`~moe_lightning.report.plots.plot_spectrum_panels` as a chart: log y (and x), one line per label."""
    shown = [(title, y_title, seed_lines(series)) for title, series in panels]
    return small_multiples(shown, kind, x_title=x_title, log_y=True, log_x=log_x, columns=3)


def curve_chart(panels: Sequence[tuple[str, str, dict[str, list[pd.Series]]]], kind: str) -> str:
    """:func:`~moe_lightning.report.plots.plot_curve_panels` as a chart: per label the mean over seeds against the
    step, with the min–max band."""
    shown = []
    for title, y_title, series in panels:
        traces: list[go.Scatter] = []
        for index, label, frame in seed_frames(series):
            color = color_for(label, index)
            seeds = f" ({frame.shape[1]} seeds)" if frame.shape[1] > 1 else ""
            if frame.shape[1] > 1:
                traces += band(frame.index, frame.min(axis=1), frame.max(axis=1), color, f"{label}: min–max")
            traces.append(
                go.Scatter(
                    x=frame.index,
                    y=frame.mean(axis=1),
                    name=f"{label}{seeds}",
                    mode="lines+markers",
                    marker={"size": 5},
                    line={"color": color},
                )
            )
        shown.append((title, y_title, traces))
    return small_multiples(shown, kind, columns=2)


def heatmap_chart(
    items: Sequence[tuple[str, np.ndarray]], kind: str, vmax: float = 1.0, colorbar: str = "|cos|", columns: int = 4
) -> str:
    """E×E matrices side by side on one colour scale [0, ``vmax``]: expert j across, expert i down."""
    titles = [title.replace("\n", "<br>") for title, _ in items]
    columns = max(1, min(columns, len(items)))
    figure = grid(titles, columns, row_px=300)
    for index, (_, matrix) in enumerate(items):
        row, column = divmod(index, columns)
        figure.add_trace(
            go.Heatmap(
                z=np.asarray(matrix, dtype=float),
                coloraxis="coloraxis",
                hovertemplate="e%{y} · e%{x}: %{z:.3f}<extra></extra>",
            ),
            row=row + 1,
            col=column + 1,
        )
    label_axes(figure, "expert j", ["expert i"] * len(items), columns)
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(
        coloraxis={"colorscale": "Viridis", "cmin": 0.0, "cmax": vmax, "colorbar": {"title": {"text": colorbar}}},
        margin={"t": 70},
    )
    figure.update_annotations(font_size=AXIS_FONT + 1)
    return chart(figure, kind)


def router_load_chart(panels: Sequence[tuple[str, pd.DataFrame]], kind: str) -> str:
    """:func:`~moe_lightning.report.plots.plot_router_load` as a chart: each expert's share against the step, and
    the uniform share 1/E dashed."""
    shown = []
    for title, frame in panels:
        traces: list[go.Scatter] = []
        for index, column in enumerate(frame.columns):
            series = frame[column].dropna()
            color = EXPERT_COLORS[index % len(EXPERT_COLORS)]
            traces.append(go.Scatter(x=series.index, y=series.values, name=str(column), line={"color": color}))
        if frame.shape[1]:
            uniform = pd.Series(1.0 / frame.shape[1], index=frame.index)
            style = {"color": "black", "dash": "dash", "width": 1}
            traces.append(go.Scatter(x=uniform.index, y=uniform.values, name="uniform 1/E", line=style))
        shown.append((title, "load share", traces))
    return small_multiples(shown, kind, columns=3)


def density_chart(panels: Sequence[tuple[str, Sequence[tuple[int, np.ndarray, np.ndarray]]]], kind: str) -> str:
    """:func:`~moe_lightning.report.plots.plot_density_panels` as a chart: a density curve per step (dark: first,
    light: last), log density axis."""
    from plotly.colors import sample_colorscale

    shown = []
    for title, series in panels:
        colours = sample_colorscale("Viridis", list(np.linspace(0.0, 0.9, len(series))))
        peak = max(float(np.nanmax(density)) for _, _, density in series)
        # Six decades below the peak, as in the PNG: the Gaussian tails of the quadrature go far lower.
        floor = peak * 1e-6 if peak > 0 else 0.0
        traces = [
            go.Scatter(x=grid_, y=np.where(density > floor, density, np.nan), name=f"step {step}", line={"color": c})
            for c, (step, grid_, density) in zip(colours, series, strict=True)
        ]
        shown.append((title, "density", traces))
    return small_multiples(shown, kind, x_title="Hessian eigenvalue", log_y=True, columns=3)
