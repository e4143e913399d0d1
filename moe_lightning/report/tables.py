"""The results table for people: one ``mean ± std`` cell per metric; the numbers are
:func:`~moe_lightning.analysis.results.results_table`."""

from __future__ import annotations

import pandas as pd

from moe_lightning.analysis.results import RUN_METRICS
from moe_lightning.analysis.steps import GEOMETRY_METRICS, MEAN_LAYER
from moe_lightning.report.format import format_mean_std

UNDERSAMPLED_MARK = "†"


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
    if "final_step" in table:
        display["final step"] = ["n/a" if pd.isna(s) else int(s) for s in table["final_step"]]
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
