"""Matplotlib figures of the report (Agg backend, no display): spectra, curves, heatmaps, PCA spectra, router load.

Every function takes plain numbers (numpy arrays, pandas series) already gathered by the caller, writes one PNG
and returns its path. Gathering, and deciding that data are missing, happens in :mod:`moe_lightning.report`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from moe_lightning.analysis.results import seed_frames, seed_stacks  # noqa: E402
from moe_lightning.report.format import format_level  # noqa: E402

ROUTING_COLORS = {
    "dense": "0.25",
    "dense_total": "0.25",
    "dense_active": "tab:purple",
    "topk": "tab:blue",
    "soft": "tab:orange",
}
_DPI = 110


def color_for(label: str, index: int) -> str:
    """A routing's fixed colour (dense and dense_total grey, dense_active purple, top-k blue, soft orange), else the
    matplotlib cycle."""
    for routing, color in ROUTING_COLORS.items():
        if label == routing or label.endswith(f":{routing}"):
            return color
    return f"C{(index + 2) % 10}"


def _grid(count: int, max_columns: int = 3, width: float = 5.0, height: float = 3.8):
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return figure, list(axes.flat[:count])


def _save(figure, path: str, title: str, header_inches: float = 0.0) -> str:
    """Title, lay out and write; ``header_inches`` keeps that much room above the panels (e.g. for a legend)."""
    # Wrap the title to the figure's width (about 11 characters per inch at the default title size).
    chars = max(30, int(figure.get_figwidth() * 11))
    lines = [wrapped for line in title.split("\n") for wrapped in textwrap.wrap(line, chars)]
    figure.suptitle("\n".join(lines))
    # tight_layout leaves the suptitle's room only roughly; on tall figures it overlaps the first row.
    top = 1.0 - (0.25 * len(lines) + 0.15 + header_inches) / figure.get_figheight()
    figure.tight_layout(rect=(0.0, 0.0, 1.0, top))
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)
    return path


def _positive(values: np.ndarray) -> np.ndarray:
    """Non-positive entries to NaN, so that log axes skip them."""
    values = np.asarray(values, dtype=float).copy()
    values[~(values > 0)] = math.nan
    return values


def plot_spectrum_panels(
    panels: Sequence[tuple[str, dict[str, list[np.ndarray]]]],
    path: str,
    title: str,
    ylabel: str,
    xlabel: str = "index i",
    log_x: bool = True,
) -> str:
    """One panel per entry; in each, one curve per series: the mean over its seeds' vectors (shaded min–max).

    Args:
        panels: ``(panel title, {series label: [vector per seed]})``; vectors of one series are cut to the shortest.
        path: the PNG to write.
        title: figure title.
        ylabel: y-axis label (log scale).
        xlabel: x-axis label (indices start at 1).
        log_x: log scale on x too.
    """
    figure, axes = _grid(len(panels))
    for ax, (panel_title, series) in zip(axes, panels, strict=True):
        for index, label, stack in seed_stacks(series):
            x = np.arange(1, stack.shape[1] + 1)
            color = color_for(label, index)
            finite = np.isfinite(stack).any()
            mean = _positive(np.nanmean(stack, axis=0)) if finite else np.full(stack.shape[1], math.nan)
            seeds = f" ({stack.shape[0]} seeds)" if stack.shape[0] > 1 else ""
            ax.plot(x, mean, color=color, label=f"{label}{seeds}", linewidth=1.6)
            if stack.shape[0] > 1:
                low, high = _positive(np.nanmin(stack, axis=0)), _positive(np.nanmax(stack, axis=0))
                ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
        ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(figure, path, title)


def plot_curve_panels(
    panels: Sequence[tuple[str, str, dict[str, list[pd.Series]]]],
    path: str,
    title: str,
) -> str:
    """Metric vs training step: per series the mean over seeds (series aligned on step) with a min–max band.

    Args:
        panels: ``(panel title, y label, {series label: [step-indexed series per seed]})``.
        path: the PNG to write.
        title: figure title.
    """
    figure, axes = _grid(len(panels), max_columns=2, width=6.0)
    for ax, (panel_title, ylabel, series) in zip(axes, panels, strict=True):
        for index, label, frame in seed_frames(series):
            color = color_for(label, index)
            seeds = f" ({frame.shape[1]} seeds)" if frame.shape[1] > 1 else ""
            ax.plot(frame.index, frame.mean(axis=1), marker="o", markersize=3, color=color, label=f"{label}{seeds}")
            if frame.shape[1] > 1:
                ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=color, alpha=0.2, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(figure, path, title)


def plot_heatmaps(items: Sequence[tuple[str, np.ndarray]], path: str, title: str, vmax: float = 1.0) -> str:
    """E×E matrices side by side, each with a colour bar (values in [0, ``vmax``]).

    Args:
        items: ``(panel title, matrix)``.
        path: the PNG to write.
        title: figure title.
        vmax: top of the colour scale (1 for |cos| alignments).
    """
    figure, axes = _grid(len(items), max_columns=3, width=4.6, height=4.2)
    for ax, (panel_title, matrix) in zip(axes, items, strict=True):
        matrix = np.asarray(matrix, dtype=float)
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
        ticks = np.arange(matrix.shape[0])
        if matrix.shape[0] <= 16:
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
        ax.set_title(panel_title, fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(figure, path, title)


def plot_router_load(panels: Sequence[tuple[str, pd.DataFrame]], path: str, title: str) -> str:
    """Per-expert token fraction vs step, one panel per entry (columns of each frame are experts).

    Args:
        panels: ``(panel title, frame indexed by step with one column per expert)``.
        path: the PNG to write.
        title: figure title.
    """
    figure, axes = _grid(len(panels), max_columns=3, width=5.0)
    for ax, (panel_title, frame) in zip(axes, panels, strict=True):
        colors = plt.get_cmap("tab20" if frame.shape[1] > 10 else "tab10")
        for index, column in enumerate(frame.columns):
            series = frame[column].dropna()
            ax.plot(series.index, series.values, color=colors(index % colors.N), linewidth=1.2, label=str(column))
        if frame.shape[1]:
            ax.axhline(1.0 / frame.shape[1], color="black", linestyle="--", linewidth=0.8, label="uniform 1/E")
        ax.set_xlabel("training step")
        ax.set_ylabel("load share (soft: gate mass share)")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(figure, path, title)


def plot_density_panels(
    panels: Sequence[tuple[str, Sequence[tuple[int, np.ndarray, np.ndarray]]]], path: str, title: str
) -> str:
    """One panel per ``(title, [(step, grid, density), ...])``: a density curve per step, coloured from the first
    step (dark) to the last (light), on a log density axis (the bulk and the outliers differ by decades)."""
    figure, axes = _grid(len(panels))
    for ax, (panel_title, series) in zip(axes, panels, strict=True):
        colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(series)))
        for colour, (step, grid, density) in zip(colours, series, strict=True):
            ax.semilogy(grid, _positive(density), color=colour, label=f"step {step}")
        peak = max(float(np.nanmax(density)) for _, _, density in series)
        if peak > 0:
            ax.set_ylim(bottom=peak * 1e-6)  # six decades below the peak: the Gaussian tails go far lower
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("Hessian eigenvalue")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    return _save(figure, path, title)


VERDICT_COLORS = {"holds": "tab:green", "does not hold": "tab:red", "inconclusive": "0.6"}


def _claim_key(level: float) -> list:
    """The legend of :func:`plot_claim_panels`: the two intervals at ``level``, the verdicts, the hollow marker."""
    percent = format_level(level)
    return [
        Patch(color="tab:blue", alpha=0.18, label=f"{percent} t-interval over seeds"),
        Line2D(
            [],
            [],
            color="tab:blue",
            marker="|",
            markersize=9,
            linestyle="-",
            label=f"{percent} bootstrap over probe tokens",
        ),
        *(Line2D([], [], color=c, marker="o", linestyle="none", label=v) for v, c in VERDICT_COLORS.items()),
        Line2D([], [], color="0.4", marker="o", markerfacecolor="white", linestyle="none", label="rests on n_eff < D"),
    ]


def _draw_difference(ax, frame: pd.DataFrame, color: str, label: str | None) -> None:
    """One series of :func:`plot_claim_panels`: the mean difference, its shaded t-interval, its bootstrap bars and
    the verdict markers."""
    frame = frame.sort_values("step")
    x = frame["step"].to_numpy(dtype=float)
    ax.plot(x, frame["mean_difference"], color=color, linewidth=1.2, label=label)
    ax.fill_between(x, frame["ci_low"], frame["ci_high"], color=color, alpha=0.18, linewidth=0)
    low, high = frame["bootstrap_low"].to_numpy(float), frame["bootstrap_high"].to_numpy(float)
    has = np.isfinite(low) & np.isfinite(high)
    if has.any():
        # Drawn from its own ends, not as an error bar around the mean: a percentile interval of the
        # bootstrap need not contain the seed mean.
        ax.vlines(x[has], low[has], high[has], colors=color, linewidth=0.8)
        ax.scatter(np.r_[x[has], x[has]], np.r_[low[has], high[has]], marker="_", s=16, color=color, linewidths=0.8)
    for verdict, color_v in VERDICT_COLORS.items():
        for flagged in (False, True):
            chosen = frame[(frame["verdict"] == verdict) & (frame["undersampled"].astype(bool) == flagged)]
            if len(chosen):
                ax.scatter(
                    chosen["step"],
                    chosen["mean_difference"],
                    s=22,
                    linewidths=1.2,
                    zorder=3,
                    facecolors="white" if flagged else color_v,
                    edgecolors=color_v,
                )


def plot_claim_panels(
    panels: Sequence[tuple[str, str, dict[str, pd.DataFrame]]],
    path: str,
    title: str,
    max_columns: int = 4,
    level: float = 0.95,
) -> str:
    """Small multiples of a paired difference over training: one panel per claim, one line per series (a layer),
    the t-interval over seeds shaded, the bootstrap interval over probe tokens as bars from its own ends, 0 dashed,
    and each step's marker coloured by its verdict (holds green, does not hold red, inconclusive grey; hollow when
    it rests on an under-sampled PCA value).

    Args:
        panels: ``(panel title, y label, {series label: frame})``; each frame has columns ``step,
            mean_difference, ci_low, ci_high, bootstrap_low, bootstrap_high, verdict, undersampled``.
        path: the PNG to write.
        title: figure title.
        max_columns: panels per row.
        level: the coverage of the intervals, named in the legend.
    """
    figure, axes = _grid(len(panels), max_columns=max_columns, width=4.4, height=3.2)
    key = _claim_key(level)
    figure.legend(
        handles=key,
        loc="upper center",
        ncol=len(key),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1.0 - (0.25 * 2 + 0.1) / figure.get_figheight()),
    )
    for ax, (panel_title, ylabel, series) in zip(axes, panels, strict=True):
        for index, (label, frame) in enumerate(series.items()):
            several = len(series) > 1
            _draw_difference(ax, frame, f"C{index % 10}" if several else "tab:blue", label if several else None)
        ax.axhline(0.0, color="black", linestyle="--", linewidth=0.7)
        ax.set_title(panel_title, fontsize=8)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return _save(figure, path, title, header_inches=0.35)
