"""The reports: ``moe-lightning report`` (results and claims tables with intervals, plots and one HTML page from
training runs) and the page of one probed pretrained model; this package only re-exports their public names.

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
    from moe_lightning.report.claims import claims_over_training
    from moe_lightning.report.decision import DECISION_RULE, Decision, decide, decide_threshold
    from moe_lightning.report.intervals import Interval, effect_size, percentile_interval, t_interval, t_quantile
    from moe_lightning.report.probe_page import render_probe
    from moe_lightning.report.runs import discover_runs

# Public name -> the module that defines it.
_SOURCES = {
    "DECISION_RULE": "decision",
    "Decision": "decision",
    "Interval": "intervals",
    "build_report": "build",
    "claims_over_training": "claims",
    "decide": "decision",
    "decide_threshold": "decision",
    "discover_runs": "runs",
    "effect_size": "intervals",
    "percentile_interval": "intervals",
    "render_probe": "probe_page",
    "t_interval": "intervals",
    "t_quantile": "intervals",
}

__all__ = [
    "DECISION_RULE",
    "Decision",
    "Interval",
    "build_report",
    "claims_over_training",
    "decide",
    "decide_threshold",
    "discover_runs",
    "effect_size",
    "percentile_interval",
    "render_probe",
    "t_interval",
    "t_quantile",
]


__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
