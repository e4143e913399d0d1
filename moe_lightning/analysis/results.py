"""Final values per run and the results table: each seed's last value of every metric, and its mean ± std over
seeds per arm and layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from moe_lightning.analysis.run import Run, arm_order, final_value
from moe_lightning.analysis.steps import GEOMETRY_METRICS, MEAN_LAYER, is_flagged, pca_site, step_values


def summarize(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample std (ddof=1), n)`` over the finite values; std is NaN for n < 2, mean NaN for n = 0."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(finite.size)
    mean = float(finite.mean()) if n else math.nan
    std = float(finite.std(ddof=1)) if n >= 2 else math.nan
    return mean, std, n


# Run-level keys (no layer): their last logged value.
RUN_METRICS: list[tuple[str, str]] = [("val/loss", "final val loss"), ("train/loss", "final train loss")]


def seed_values(runs: list[Run], layer_mode: str = "mean") -> pd.DataFrame:
    """Each finished run's final value of every metric.

    The final value of a geometry metric is its value at the layer's last probe step; with ``layer_mode="mean"``
    it is then averaged over the run's layers (NaN layers left out; NaN when every layer is NaN). Run-level
    metrics (``val/loss``, ``train/loss``) take their last logged value.

    Args:
        runs: runs from :func:`~moe_lightning.analysis.discover.discover_runs`; only ``run.ok`` runs are used.
        layer_mode: ``"mean"`` (one row per run, ``layer="mean"``) or ``"each"`` (one row per run and layer).

    Returns:
        Long table with columns ``family, routing, arm, seed, layer, step, metric, value, replicates,
        undersampled, min_n_eff, width, path`` (:func:`~moe_lightning.analysis.steps.step_values` with
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


def _oldest_step(group: pd.DataFrame) -> int | None:
    """The oldest probe step among the geometry rows of ``group`` (the run-level metrics have none)."""
    steps = group["step"].dropna()
    return int(steps.min()) if len(steps) else None


def results_table(values: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and n over seeds of every metric, one row per (family, arm, layer).

    Args:
        values: the output of :func:`seed_values`.

    Returns:
        Columns ``family, arm, routing, layer, n_seeds, seeds, final_step`` and, for every metric key ``k``,
        ``k:mean``, ``k:std``, ``k:n`` (n counts the seeds with a finite value); for PCA keys also
        ``k:undersampled``, the number of those seeds whose value rests on an expert with ``n_eff`` below the
        site's width. ``final_step`` is the probe step the row's final geometry values come from, the oldest over
        its seeds and layers when they differ (None without geometry values).
    """
    metrics = [key for key, _ in GEOMETRY_METRICS + RUN_METRICS]
    out = []
    if values.empty:
        return pd.DataFrame(columns=["family", "arm", "routing", "layer", "n_seeds", "seeds", "final_step"])
    for (family, arm, layer), group in values.groupby(["family", "arm", "layer"], sort=False):
        seeds = sorted({int(s) for s in group["seed"].dropna()})
        row: dict[str, object] = {
            "family": family,
            "arm": arm,
            "routing": group["routing"].iloc[0],
            "layer": layer,
            "n_seeds": int(group["path"].nunique()),
            "seeds": " ".join(str(s) for s in seeds),
            "final_step": _oldest_step(group),
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


def seed_frames(series: dict[str, list[pd.Series]]) -> list[tuple[int, str, pd.DataFrame]]:
    """``(index, label, frame)`` per series label with any logged value, in order: its seeds' step-indexed series
    side by side (one column a seed), the data of one curve panel whichever library draws it."""
    frames = []
    for index, (label, per_seed) in enumerate(series.items()):
        logged = [s.dropna() for s in per_seed if len(s.dropna())]
        if logged:
            frames.append((index, label, pd.concat(logged, axis=1).sort_index()))
    return frames


def seed_stacks(series: dict[str, list[np.ndarray]]) -> list[tuple[int, str, np.ndarray]]:
    """``(index, label, stack)`` per series label with a non-empty vector: its seeds' vectors cut to the shortest,
    one row a seed (the spectra panels, whichever library draws them)."""
    stacks = []
    for index, (label, vectors) in enumerate(series.items()):
        arrays = [np.asarray(v, dtype=float) for v in vectors if np.asarray(v).size]
        if arrays:
            length = min(v.size for v in arrays)
            stacks.append((index, label, np.vstack([v[:length] for v in arrays])))
    return stacks
