"""The end-of-fit summary: each MoE layer's geometry at the first and the last probe, read back from the run's
own log, and the run's local report (``moe_lightning.report``), so a run without a W&B account shows its result."""

from __future__ import annotations

import math
import os

import pandas as pd

from moe_lightning.analysis.discover import discover_runs
from moe_lightning.analysis.run import Run, layer_names
from moe_lightning.report import build_report

# (column title, metric key under geometry/<layer>/): the quantities a first look needs.
GEOMETRY_COLUMNS = (
    ("sigma_max", "jac_sigma_max/mean"),
    ("jac_eff_rank", "jac_effective_rank/mean"),
    ("pca_eff_rank", "pca_hidden_effective_rank/mean"),
    ("align/chance", "align_ratio"),
)
ROUTER_COLUMN = ("load_cv", "load_cv")


def _value_near(series: pd.Series, step: int) -> float:
    """The value logged at ``step`` or the last one before it; the first one after when none came before."""
    logged = series.dropna()
    if not len(logged):
        return math.nan
    before = logged[logged.index <= step]
    return float(before.iloc[-1] if len(before) else logged.iloc[0])


def geometry_summary(history: pd.DataFrame) -> list[dict[str, object]]:
    """One row per probed layer and probe (the first and the last), with the ``GEOMETRY_COLUMNS`` and the router's
    load coefficient of variation at the nearest logged step."""
    rows: list[dict[str, object]] = []
    for layer in layer_names(history):
        probed = history[f"geometry/{layer}/tokens_total"].dropna().index
        for step in dict.fromkeys((int(probed[0]), int(probed[-1]))):
            row: dict[str, object] = {"layer": layer, "step": step}
            for title, key in GEOMETRY_COLUMNS:
                column = f"geometry/{layer}/{key}"
                row[title] = float(history.at[step, column]) if column in history.columns else math.nan
            router = f"router/{layer}/{ROUTER_COLUMN[1]}"
            row[ROUTER_COLUMN[0]] = _value_near(history[router], step) if router in history.columns else math.nan
            rows.append(row)
    return rows


def format_summary(rows: list[dict[str, object]]) -> str:
    """A plain-text table of :func:`geometry_summary`'s rows; a quantity a layer does not have prints as ``-``."""
    titles = ["layer", "step", *(t for t, _ in GEOMETRY_COLUMNS), ROUTER_COLUMN[0]]

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    table = [titles, *([cell(row[t]) for t in titles] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(titles))]
    lines = [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True)))
        for line in table
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def summarize_run(directory: str, out_dir: str | None = None) -> tuple[str, str]:
    """The summary table of the run in ``directory`` and the path of its report's ``index.html``.

    Args:
        directory: a run folder (``moe-lightning fit``'s, a W&B offline run, a CSV or a TensorBoard log folder).
        out_dir: where the report goes; default ``<directory>/report``.

    Raises:
        ValueError: ``directory`` holds no run, or the run logged no geometry.
    """
    runs: list[Run] = discover_runs([directory])
    if len(runs) != 1:
        raise ValueError(f"expected one run in {directory!r}, found {len(runs)}")
    rows = geometry_summary(runs[0].history)
    if not rows:
        raise ValueError(f"the run in {directory!r} logged no geometry (is GeometryMonitor among the callbacks?)")
    out_dir = out_dir or os.path.join(directory, "report")
    paths = build_report([directory], out_dir=out_dir)
    index = next((p for p in paths if p.endswith("index.html")), paths[-1])
    return format_summary(rows), index
