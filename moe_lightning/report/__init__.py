"""The reports: ``moe-lightning report`` (results and claims tables, plots and one HTML page from training runs)
and the page of one probed pretrained model; this package only re-exports their public names.

Python::

    from moe_lightning.report import build_report, render_probe
    paths = build_report(["runs/sweep-mlp"])
"""

from moe_lightning.report.build import build_report
from moe_lightning.report.command import main
from moe_lightning.report.probe_page import render_probe
from moe_lightning.report.runs import discover_runs
from moe_lightning.report.tables import DECISION_RULE, Decision, decide, decide_threshold

__all__ = [
    "DECISION_RULE",
    "Decision",
    "build_report",
    "decide",
    "decide_threshold",
    "discover_runs",
    "main",
    "render_probe",
]
