"""The reports, drawn from the runs and statistics of :mod:`moe_lightning.analysis`: ``moe-lightning report``
(results and claims tables with intervals, figures and one HTML page from training runs; a single run's page is its
interactive dashboard), the W&B workspace of the geometry, and the page of one probed pretrained model. Rendering
only; this package re-exports the public names of its modules.

The names load on first use, so ``moe-lightning report --help`` and its argument errors answer without pandas,
matplotlib or torch.

Python::

    from moe_lightning.report import build_report, render_probe
    paths = build_report(["runs/sweep-mlp"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names

if TYPE_CHECKING:
    from moe_lightning.report.build import build_report
    from moe_lightning.report.claims_render import claims_display, claims_table, interval_labels
    from moe_lightning.report.dashboard import dashboard_sections
    from moe_lightning.report.figures import write_figures
    from moe_lightning.report.probe_page import render_probe
    from moe_lightning.report.tables import results_display
    from moe_lightning.report.workspace import geometry_report, geometry_sections, geometry_workspace

# Public name -> the module that defines it.
_SOURCES = {
    "build_report": "build",
    "claims_display": "claims_render",
    "claims_table": "claims_render",
    "dashboard_sections": "dashboard",
    "geometry_report": "workspace",
    "geometry_sections": "workspace",
    "geometry_workspace": "workspace",
    "interval_labels": "claims_render",
    "render_probe": "probe_page",
    "results_display": "tables",
    "write_figures": "figures",
}

__all__ = [
    "build_report",
    "claims_display",
    "claims_table",
    "dashboard_sections",
    "geometry_report",
    "geometry_sections",
    "geometry_workspace",
    "interval_labels",
    "render_probe",
    "results_display",
    "write_figures",
]

# Names 0.1 documented here that now live in moe_lightning.analysis: for one release they still read from this
# package, with a FutureWarning naming the new path.
_MOVED = {
    name: "moe_lightning.analysis"
    for name in (
        "DECISION_RULE",
        "Decision",
        "Interval",
        "claims_over_training",
        "decide",
        "decide_threshold",
        "discover_runs",
        "effect_size",
        "percentile_interval",
        "t_interval",
        "t_quantile",
    )
}

__getattr__, __dir__ = lazy_names(__name__, _SOURCES, moved=_MOVED)
