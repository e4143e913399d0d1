"""Final values per run and the results table (mean ± std over seeds). The claims (:mod:`moe_lightning.report.claims`),
their table (:mod:`moe_lightning.report.claims_render`) and the decision rule (:mod:`moe_lightning.report.decision`)
live in their own modules and are re-exported here under their old names."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe_lightning.report.choices import LAYER_MODES
from moe_lightning.report.claims import Claim, paper_claims
from moe_lightning.report.claims_render import claims_display, claims_table
from moe_lightning.report.decision import DECISION_RULE, Decision, decide, decide_threshold
from moe_lightning.report.format import format_mean_std, format_number, markdown_table, summarize
from moe_lightning.report.intervals import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE
from moe_lightning.report.runs import Run, arm_order, final_value
from moe_lightning.report.steps import GEOMETRY_METRICS, MEAN_LAYER, is_flagged, pca_site, step_values

__all__ = [
    "DECISION_RULE",
    "DOES_NOT_HOLD",
    "GEOMETRY_METRICS",
    "HOLDS",
    "INCONCLUSIVE",
    "LAYER_MODES",
    "MEAN_LAYER",
    "RUN_METRICS",
    "Claim",
    "Decision",
    "claims_display",
    "claims_table",
    "decide",
    "decide_threshold",
    "format_mean_std",
    "format_number",
    "markdown_table",
    "paper_claims",
    "results_display",
    "results_table",
    "seed_values",
    "summarize",
]

# Run-level keys (no layer): their last logged value.
RUN_METRICS: list[tuple[str, str]] = [("val/loss", "final val loss"), ("train/loss", "final train loss")]
UNDERSAMPLED_MARK = "†"


def seed_values(runs: list[Run], layer_mode: str = "mean") -> pd.DataFrame:
    """Each finished run's final value of every metric.

    The final value of a geometry metric is its value at the layer's last probe step; with ``layer_mode="mean"``
    it is then averaged over the run's layers (NaN layers left out; NaN when every layer is NaN). Run-level
    metrics (``val/loss``, ``train/loss``) take their last logged value.

    Args:
        runs: runs from :func:`~moe_lightning.report.runs.discover_runs`; only ``run.ok`` runs are used.
        layer_mode: ``"mean"`` (one row per run, ``layer="mean"``) or ``"each"`` (one row per run and layer).

    Returns:
        Long table with columns ``family, routing, arm, seed, layer, step, metric, value, replicates,
        undersampled, min_n_eff, width, path`` (:func:`~moe_lightning.report.steps.step_values` with
        ``final_only=True``, plus the run-level metrics).
    """
    geometry = step_values(runs, layer_mode, final_only=True)
    rows = []
    for run in runs:
        if not run.ok:
            continue
        base = {"family": run.family or "", "routing": run.routing, "arm": run.arm, "seed": run.seed, "path": run.path}
        own = geometry[geometry["path"] == run.path]
        layers = list(dict.fromkeys(own["layer"])) or [MEAN_LAYER]
        for layer in layers:
            rows.extend(
                {**base, "layer": layer, "metric": key, "value": final_value(run.history, key)}
                for key, _ in RUN_METRICS
            )
    frames = [f for f in (geometry, pd.DataFrame(rows)) if not f.empty]
    if not frames:
        return geometry
    return pd.concat(frames, ignore_index=True).reindex(columns=geometry.columns)


def results_table(values: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and n over seeds of every metric, one row per (family, arm, layer).

    Args:
        values: the output of :func:`seed_values`.

    Returns:
        Columns ``family, arm, routing, layer, n_seeds, seeds`` and, for every metric key ``k``, ``k:mean``,
        ``k:std``, ``k:n`` (n counts the seeds with a finite value); for PCA keys also ``k:undersampled``, the
        number of those seeds whose value rests on an expert with ``n_eff`` below the site's width.
    """
    metrics = [key for key, _ in GEOMETRY_METRICS + RUN_METRICS]
    out = []
    if values.empty:
        return pd.DataFrame(columns=["family", "arm", "routing", "layer", "n_seeds", "seeds"])
    for (family, arm, layer), group in values.groupby(["family", "arm", "layer"], sort=False):
        seeds = sorted({int(s) for s in group["seed"].dropna()})
        row: dict[str, object] = {
            "family": family,
            "arm": arm,
            "routing": group["routing"].iloc[0],
            "layer": layer,
            "n_seeds": int(group["path"].nunique()),
            "seeds": " ".join(str(s) for s in seeds),
        }
        for key in metrics:
            rows = group[group["metric"] == key]
            mean, std, n = summarize(rows["value"].tolist())
            row[f"{key}:mean"], row[f"{key}:std"], row[f"{key}:n"] = mean, std, n
            if pca_site(key):
                finite = rows[np.isfinite(rows["value"].to_numpy(dtype=float))]
                row[f"{key}:undersampled"] = int(sum(is_flagged(f) for f in finite["undersampled"]))
        out.append(row)
    table = pd.DataFrame(out)
    layer_rank = {layer: i for i, layer in enumerate(dict.fromkeys(values["layer"]))}
    table["_order"] = [
        (f, arm_order(a), layer_rank[la]) for f, a, la in zip(table.family, table.arm, table.layer, strict=True)
    ]
    return table.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def results_display(table: pd.DataFrame) -> pd.DataFrame:
    """The results table for people: one ``mean ± std`` column per metric, plus arm, layer and seeds; a PCA value
    resting on an under-sampled expert is marked ``(†u/n)`` (u of its n seeds)."""
    display = pd.DataFrame()
    if len(set(table.get("family", []))) > 1:
        display["family"] = table["family"]
    display["arm"] = table["arm"]
    if set(table.get("layer", [])) != {MEAN_LAYER}:
        display["layer"] = table["layer"]
    display["n seeds"] = table["n_seeds"]
    for key, title in GEOMETRY_METRICS + RUN_METRICS:
        if f"{key}:mean" not in table or not table[f"{key}:n"].any():
            continue  # a metric no run logged (e.g. val/loss without validation)
        cells = [
            format_mean_std(m, s, n)
            for m, s, n in zip(table[f"{key}:mean"], table[f"{key}:std"], table[f"{key}:n"], strict=True)
        ]
        if f"{key}:undersampled" in table:
            cells = [
                f"{c} ({UNDERSAMPLED_MARK}{u}/{n})" if u else c
                for c, u, n in zip(cells, table[f"{key}:undersampled"], table[f"{key}:n"], strict=True)
            ]
        display[f"{title} [{key}]"] = cells
    return display
