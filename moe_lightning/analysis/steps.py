"""Each run's geometry values at every probe step, with what the claims need beside the value: the within-seed
bootstrap replicates over probe tokens (from ``geometry/step_<step>.json``) and, for a PCA value, whether it rests
on an expert whose effective sample size ``n_eff`` is below the site's width."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import pandas as pd

from moe_lightning.analysis.choices import LAYER_MODES
from moe_lightning.analysis.run import Run, geometry_steps, last_probe_step, layer_names
from moe_lightning.common.final_probe import STALE_SHARE, stale_final_probe

# (metric key below geometry/<layer>/, column title). "/mean" keys are means over the layer's experts.
GEOMETRY_METRICS: list[tuple[str, str]] = [
    ("jac_sigma_max/mean", "σ_max (expert mean)"),
    ("jac_decay_slope/mean", "decay slope α (expert mean)"),
    ("jac_effective_rank/mean", "Jacobian eff. rank (expert mean)"),
    ("layer_jac_sigma_max", "layer σ_max"),
    ("layer_jac_decay_slope", "layer decay slope α"),
    ("pca_input_effective_rank/mean", "PCA eff. rank, input"),
    ("pca_hidden_effective_rank/mean", "PCA eff. rank, hidden"),
    ("pca_output_effective_rank/mean", "PCA eff. rank, output"),
    ("align_mean_offdiag", "alignment A, off-diag mean"),
    ("align_ratio", "A / chance"),
    ("palign_mean_offdiag", "pointwise alignment P, off-diag mean"),
    ("subspace_rep_overlap", "rep. subspace overlap"),
    ("subspace_fun_overlap", "fun. subspace overlap"),
    ("subspace_overlap_chance", "overlap chance r/d"),
]
MEAN_LAYER = "mean"
COLUMNS = [
    "family",
    "routing",
    "arm",
    "seed",
    "layer",
    "step",
    "metric",
    "value",
    "replicates",
    "undersampled",
    "min_n_eff",
    "width",
    "path",
]
_PCA_KEY = re.compile(r"^pca_([a-z]+)_")


def is_flagged(value: Any) -> bool:
    """Whether an ``undersampled`` cell says yes (it may hold a bool, a numpy bool, None or NaN)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def pca_site(metric: str) -> str | None:
    """The PCA site of a metric key (``"pca_hidden_effective_rank/mean"`` -> ``"hidden"``), None for others."""
    match = _PCA_KEY.match(metric)
    return match.group(1) if match else None


def load_step_payloads(run: Run, steps: set[int] | None = None) -> dict[int, dict[str, Any]]:
    """``step -> {layer: the layer's dict}`` of every readable ``geometry/step_<step>.json`` of ``run`` (only those
    of ``steps`` when given)."""
    payloads: dict[int, dict[str, Any]] = {}
    for step, path in geometry_steps(run.geometry_dir):
        if steps is not None and step not in steps:
            continue
        try:
            with open(path) as handle:
                layers = json.load(handle).get("layers", {})
        except (OSError, ValueError, AttributeError):
            continue  # a half-written or foreign file: that step has no replicates or PCA details
        if isinstance(layers, dict):
            payloads[step] = layers
    return payloads


def bootstrap_replicates(layer: dict[str, Any] | None, metric: str) -> np.ndarray | None:
    """The replicates of ``metric`` in a layer's ``"bootstrap"`` entry (``{"replicates": B, "seed": S,
    "values": {metric: [B floats]}}``), None when the run saved none."""
    entry = (layer or {}).get("bootstrap")
    if not isinstance(entry, dict):
        return None
    values = (entry.get("values") or {}).get(metric)
    if values is None:
        return None
    return np.asarray([math.nan if v is None else v for v in values], dtype=float)


def pca_sampling(
    layer: dict[str, Any] | None, history: pd.DataFrame, key_prefix: str, step: int, site: str
) -> tuple[bool | None, float, float]:
    """Whether a layer's PCA value at ``site`` rests on an under-sampled expert: ``(flag, min n_eff, width)``.

    Only experts with routed tokens count (an empty expert has no value in the expert mean). An expert is
    under-sampled when ``n_eff = (Σw)²/Σw² < width``, the width of the vectors whose covariance is taken (D at the
    input and output sites, the hidden width at the hidden site), so its covariance has rank below the width. The
    saved report gives each expert's ``n_eff`` and eigenvalues (width); without it the logged per-expert keys
    ``pca_<site>_n_eff/e<i>`` and ``pca_<site>_undersampled/e<i>`` are used (width then unknown, NaN). The flag is
    None when neither says.
    """
    results = ((layer or {}).get("pca") or {}).get(site)
    if isinstance(results, list) and results:
        routed = [r for r in results if isinstance(r, dict) and float(r.get("total_weight", 0.0)) > 0]
        if not routed:
            return None, math.nan, math.nan
        worst = min(routed, key=lambda r: float(r["n_eff"]) / max(len(r.get("eigenvalues") or []), 1))
        width = len(worst.get("eigenvalues") or []) or int((layer or {}).get("dim", 0)) or math.nan
        n_eff = float(worst["n_eff"])
        return bool(n_eff < width) if math.isfinite(width) else None, n_eff, float(width)
    flags, n_effs = [], []
    prefix = f"{key_prefix}/pca_{site}_"
    for column in history.columns:
        name = str(column)
        if not (name.startswith(f"{prefix}undersampled/e") and step in history.index):
            continue
        expert = name.rsplit("/", 1)[1]
        rank = (
            history.at[step, f"{prefix}effective_rank/{expert}"]
            if f"{prefix}effective_rank/{expert}" in history
            else math.nan
        )
        flag = history.at[step, column]
        if not (np.isfinite(rank) and np.isfinite(flag)):
            continue
        flags.append(bool(flag > 0.5))
        n_eff_key = f"{prefix}n_eff/{expert}"
        if n_eff_key in history.columns and np.isfinite(history.at[step, n_eff_key]):
            n_effs.append(float(history.at[step, n_eff_key]))
    if not flags:
        return None, math.nan, math.nan
    return any(flags), min(n_effs) if n_effs else math.nan, math.nan


def _layer_rows(run: Run, final_only: bool) -> list[dict[str, Any]]:
    """One row per (layer, probe step, metric) of one run."""
    history = run.history
    probed = {
        layer: [int(s) for s in history[f"geometry/{layer}/tokens_total"].dropna().index]
        for layer in layer_names(history)
    }
    if final_only:
        probed = {layer: steps[-1:] for layer, steps in probed.items()}
    payloads = load_step_payloads(run, {s for steps in probed.values() for s in steps})
    base = {"family": run.family or "", "routing": run.routing, "arm": run.arm, "seed": run.seed, "path": run.path}
    rows = []
    for layer, steps in probed.items():
        for step in steps:
            saved = payloads.get(step, {}).get(layer)
            for key, _ in GEOMETRY_METRICS:
                column = f"geometry/{layer}/{key}"
                value = float(history.at[step, column]) if column in history.columns else math.nan
                site = pca_site(key)
                flag, n_eff, width = (
                    pca_sampling(saved, history, f"geometry/{layer}", step, site)
                    if site
                    else (None, math.nan, math.nan)
                )
                rows.append(
                    {
                        **base,
                        "layer": layer,
                        "step": step,
                        "metric": key,
                        "value": value,
                        "replicates": bootstrap_replicates(saved, key),
                        "undersampled": flag,
                        "min_n_eff": n_eff,
                        "width": width,
                    }
                )
    return rows


def _mean_over_layers(group: pd.DataFrame) -> dict[str, Any]:
    """A seed's layer mean: the mean over layers with a finite value; its replicates the replicate-wise mean over
    the same layers (None when one of them has none); under-sampled when any of them is."""
    finite = group[np.isfinite(group["value"].to_numpy(dtype=float))]
    value = float(finite["value"].mean()) if len(finite) else math.nan
    replicates = None
    reps = list(finite["replicates"])
    if reps and all(r is not None for r in reps):
        length = min(r.size for r in reps)
        replicates = np.mean(np.vstack([r[:length] for r in reps]), axis=0)
    flags = [bool(f) for f in finite["undersampled"] if isinstance(f, (bool, np.bool_))]
    flag = any(flags) if flags else None
    ratio = finite["min_n_eff"].to_numpy(dtype=float) / finite["width"].to_numpy(dtype=float)
    worst = finite.iloc[int(np.nanargmin(ratio))] if np.isfinite(ratio).any() else None
    if worst is None and finite["min_n_eff"].notna().any():
        worst = finite.loc[finite["min_n_eff"].idxmin()]
    return {
        "step": int(group["step"].min()),  # per step, the step; of final values, the oldest one in the mean
        "value": value,
        "replicates": replicates,
        "undersampled": flag,
        "min_n_eff": math.nan if worst is None else float(worst["min_n_eff"]),
        "width": math.nan if worst is None else float(worst["width"]),
    }


def step_values(runs: list[Run], layer_mode: str = "mean", final_only: bool = False) -> pd.DataFrame:
    """Each finished run's geometry values at every probe step (or only the last, ``final_only``).

    Args:
        runs: runs from :func:`~moe_lightning.analysis.discover.discover_runs`; only ``run.ok`` runs are used.
        layer_mode: ``"mean"`` (each seed's value averaged over its layers, per step; with ``final_only`` over each
            layer's last probe step) or ``"each"`` (one row per layer).
        final_only: keep each layer's last probe step only.

    Returns:
        Long table with columns :data:`COLUMNS`: ``replicates`` holds the bootstrap replicates (an array, or None
        for runs that saved none), ``undersampled`` True/False/None for PCA values (None for other metrics),
        ``min_n_eff`` and ``width`` the most under-sampled expert's ``n_eff`` and its site's width.
    """
    if layer_mode not in LAYER_MODES:
        raise ValueError(f"layer_mode={layer_mode!r} is not supported; allowed values: {', '.join(LAYER_MODES)}")
    rows = [row for run in runs if run.ok for row in _layer_rows(run, final_only)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if layer_mode == "each" or frame.empty:
        return frame
    keys = ["path", "metric"] if final_only else ["path", "step", "metric"]
    merged = []
    for _, group in frame.groupby(keys, sort=False):
        first = group.iloc[0]
        merged.append(
            {
                **{c: first[c] for c in ("family", "routing", "arm", "seed", "metric", "path")},
                "layer": MEAN_LAYER,
                **_mean_over_layers(group),
            }
        )
    return pd.DataFrame(merged, columns=COLUMNS)


def last_logged_step(run: Run) -> int | None:
    """The last step at which ``run`` logged anything (its last training step, as far as its log tells)."""
    history = run.history
    return None if history is None or history.empty else int(history.index.max())


def stale_final_values(runs: list[Run]) -> list[str]:
    """One line for each finished run whose final geometry values do not describe the model its training ended
    with: its last probe (the oldest last probe over its layers) lies more than
    :data:`~moe_lightning.common.final_probe.STALE_SHARE` of its steps before the last step it logged (or is the
    step-0 probe of the initialisation). Runs without a probe say nothing."""
    lines = []
    for run in runs:
        if not run.ok:
            continue
        layers = layer_names(run.history)
        last = last_logged_step(run)
        probes = [p for p in (last_probe_step(run.history, layer) for layer in layers) if p is not None]
        if not probes or last is None or not stale_final_probe(min(probes), last):
            continue
        probe = min(probes)
        what = "the initialisation (step 0)" if probe == 0 else f"step {probe}"
        lines.append(
            f"{run.label} ({run.path}): its final values come from {what}, {last - probe} steps before its last "
            f"logged step ({last}), more than {STALE_SHARE:.0%} of its steps; they do not describe the trained model"
        )
    return lines
