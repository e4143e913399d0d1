"""The end-of-fit summary: each MoE layer's geometry at the first and the last probe, read back from the run's
own log, and the run's local report (``moe_lightning.report``), so a run without a W&B account shows its result."""

from __future__ import annotations

import math
import os

from moe_lightning.analysis.discover import discover_runs
from moe_lightning.analysis.overview import GEOMETRY_COLUMNS, ROUTER_COLUMN
from moe_lightning.analysis.overview import first_last as geometry_summary
from moe_lightning.analysis.run import Run
from moe_lightning.report import build_report


def format_summary(rows: list[dict[str, object]]) -> str:
    """A plain-text table of the rows of :func:`~moe_lightning.analysis.overview.first_last`; a quantity a layer
    does not have prints as ``-``."""
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
