"""The page of a single run: what the run was (its settings and wall time), each layer's geometry at the first and
the last probe (the table ``moe-lightning fit`` prints), its final values, what every mark on the page means, then
its interactive dashboard (:mod:`moe_lightning.report.dashboard`)."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from moe_lightning.analysis.overview import first_last, run_settings
from moe_lightning.analysis.run import Run, arm_order
from moe_lightning.report import charts
from moe_lightning.report import html as page
from moe_lightning.report.dashboard import dashboard_sections
from moe_lightning.report.format import format_number
from moe_lightning.report.tables import UNDERSAMPLED_MARK

NOT_RECORDED = "not recorded"
# What every mark of the page means, in the order a reader meets them.
MARKS = [
    (
        f"{UNDERSAMPLED_MARK}u/n",
        "after a PCA value: in u of its n seeds (here n = 1, the run itself) the value rests on an expert whose "
        "effective sample size n_eff = (Σw)²/Σw² is below the width D of the site, so its covariance is "
        "rank-deficient by sampling and its effective rank is bounded by the tokens it saw, not only by the geometry. "
        "More probe tokens (GeometryMonitor max_tokens, min_tokens_per_expert) lift it.",
    ),
    ("n/a", "not logged for this run (e.g. the alignment of a dense layer, which has one expert)."),
    ("black line", "the layer's value, or the mean over its experts; a single probe is drawn as a point."),
    ("coloured lines", "the experts e0, e1, … (legend of each chart; click a name to hide it in every panel)."),
    ("grey band", "± the token-level standard deviation logged with the quantity (its <quantity>_std key)."),
    (
        "dashed red line",
        "the chance level: E|cos| of Gaussian matrices for the alignments, r/d for the subspace overlaps, 1 for the "
        "ratios; a value near it says the experts are no more aligned than random ones.",
    ),
    ("dashed black line", "the uniform share 1/E of the router load, or zero for a difference."),
    (
        "colour scales",
        "spectra: log10 σ_i (and log10 of the change since the first probe: red grown, blue shrunk); router load: "
        "each expert's share of the routed assignments; matrices: |cos| or overlap in [0, 1].",
    ),
    ("constant", "a logged series that never changed is listed in one line under its chart instead of drawn."),
]


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.3g} s"


def _text(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(value, float):
        return format_number(value)
    return str(value)


def settings_block(run: Run) -> str:
    """The run's settings and wall time, as a compact table, and where it was read from."""
    settings = run_settings(run)
    wall = settings.pop("wall time")
    shown = {label: _text(value) for label, value in settings.items()}
    if wall is None:
        shown["wall time"] = f"{NOT_RECORDED} (a CSV or TensorBoard log keeps no clock)"
    else:
        source = "the sweep job's process" if run.preset is not None else "W&B: the logger's start to its last row"
        shown["wall time"] = f"{_duration(wall)} ({source})"
    where = f"Read from the {run.source} log in {run.path}; status: {run.status}" + (
        f" ({run.note})." if run.note else "."
    )
    return page.settings_html(shown) + page.paragraph(where, "caption")


def runs_settings_block(runs: list[Run]) -> str:
    """The settings of several runs in one table: a value they share once, values that differ side by side."""
    used = sorted([r for r in runs if r.ok] or runs, key=lambda r: (arm_order(r.arm), -1 if r.seed is None else r.seed))
    per_run = [run_settings(run) for run in used]
    walls = [w for w in (s.pop("wall time") for s in per_run) if w is not None]
    shown = {}
    for label in per_run[0]:
        values = list(dict.fromkeys(_text(s[label]) for s in per_run))
        shown[label] = " / ".join(values)
    if walls:
        shown["wall time per run"] = " – ".join(dict.fromkeys((_duration(min(walls)), _duration(max(walls)))))
    else:
        shown["wall time per run"] = NOT_RECORDED
    return page.settings_html(shown)


def first_last_table(run: Run) -> str:
    """Each layer's geometry at the first and the last probe, as ``moe-lightning fit`` prints it."""
    rows = first_last(run.history) if run.history is not None else []
    if not rows:
        return page.paragraph("no geometry was logged (is GeometryMonitor among the callbacks?)", "note")
    frame = pd.DataFrame(rows)
    for column in frame.columns[2:]:
        frame[column] = [format_number(v) for v in frame[column]]
    caption = (
        "σ_max and effective rank of the experts' Jacobians (expert mean), the effective rank of the tokens at the "
        "hidden site (PCA), the alignment over its chance level, and the router's load coefficient of variation at "
        "the nearest logged step."
    )
    return page.paragraph(caption, "caption") + page.table_html(frame)


def final_values(shown: pd.DataFrame, caption: str) -> str:
    """The results row of a single run, one metric a line (a row of 18 columns would not fit the page)."""
    if len(shown) != 1:
        return page.paragraph(caption, "caption") + page.split_tables(
            shown, [c for c in ("arm", "layer") if c in shown]
        )
    row = shown.iloc[0]
    frame = pd.DataFrame({"metric": list(shown.columns), "value": [str(v) for v in row]})
    return page.paragraph(caption, "caption") + page.table_html(frame)


def write_run_page(out_dir: str, run: Run, results: pd.DataFrame, caption: str, runs_table: str) -> str:
    """Write ``<out_dir>/index.html``, the run's page; returns its path."""
    from moe_lightning.report.figures import curvature_densities

    densities = curvature_densities(run)
    sections = [
        ("Run", settings_block(run)),
        ("First and last probe", first_last_table(run)),
        ("Final values", final_values(results, caption)),
        ("How to read this page", page.marks_html(MARKS)),
        *dashboard_sections(run),
    ]
    if densities:
        body = charts.density_chart([(run.label, densities)], "curvature_density")
        sections.append(("Hessian spectral density", body))
    sections.append(("Where the run was read from", runs_table))
    title = f"moe-lightning run: {run.label}"
    path = os.path.join(out_dir, "index.html")
    return page.write_page(path, title, sections, head=charts.plotly_script(), contents=True)
