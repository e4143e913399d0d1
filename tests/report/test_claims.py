"""The claims as data and the one loop that decides them, on small frames built here: the claim list against the
probe's PCA sites and the report's controls, and the intervals at a non-default level against scipy and numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moe_lightning.analysis.claims import claims_over_training, paper_claims
from moe_lightning.analysis.run import CONTROLS
from moe_lightning.geometry.probe_config import PCA_SITES
from moe_lightning.report.claims_render import claims_display, claims_table, interval_labels

METRIC = "jac_sigma_max/mean"
TOPK = [1.0, 1.2, 0.9, 1.4]
DENSE = [2.0, 1.7, 2.3, 1.9]
REPLICATES = 50


def test_every_moe_claim_meets_both_routings_and_both_controls():
    claims = paper_claims()
    against_dense: dict[tuple[str, str], set[tuple[str, str | None]]] = {}
    for claim in claims:
        if claim.b in CONTROLS:
            against_dense.setdefault((claim.claim, claim.metric), set()).add((claim.a, claim.b))
    every_pair = {(moe, control) for moe in ("topk", "soft") for control in CONTROLS}
    assert against_dense and all(pairs == every_pair for pairs in against_dense.values())
    c2 = {metric for name, metric in against_dense if name == "C2"}
    assert c2 == {f"pca_{site}_effective_rank/mean" for site in PCA_SITES}
    assert [(c.a, c.relation) for c in claims if c.b is None] == [("topk", "<"), ("soft", "<")]
    assert len(set(claims)) == len(claims) == 29


def seed_frame(steps: tuple[int, ...] = (0,)) -> pd.DataFrame:
    """σ_max of top-k and dense_total over 4 seeds (shifted by 0.1 per step), with bootstrap replicates."""
    rows = []
    for step in steps:
        for arm, values in (("topk", TOPK), ("dense_total", DENSE)):
            for seed, value in enumerate(values):
                rng = np.random.default_rng([seed, step, len(arm)])
                shifted = value + 0.1 * step * (arm == "topk")
                replicates = shifted + 0.2 * rng.standard_normal(REPLICATES)
                row = {"family": "mlp", "layer": "mean", "seed": seed, "step": step, "arm": arm}
                rows.append({**row, "metric": METRIC, "value": shifted, "replicates": replicates})
    return pd.DataFrame(rows)


def reference(frame: pd.DataFrame, level: float) -> tuple[tuple[float, float], np.ndarray]:
    """scipy's t-interval of the paired differences and numpy's percentile interval of their replicate means."""
    arms = {arm: rows.sort_values("seed") for arm, rows in frame.groupby("arm")}
    d = arms["topk"]["value"].to_numpy() - arms["dense_total"]["value"].to_numpy()
    ci = stats.t.interval(level, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    per_seed = np.stack(arms["topk"]["replicates"].to_list()) - np.stack(arms["dense_total"]["replicates"].to_list())
    boot = np.quantile(per_seed.mean(axis=0), [(1 - level) / 2, (1 + level) / 2])
    return ci, boot


@pytest.mark.parametrize(("level", "percent"), [(0.95, "95%"), (0.9, "90%"), (0.975, "97.5%")])
def test_interval_labels_name_the_level(level, percent):
    assert interval_labels(level) == (f"{percent} t-interval (seeds)", f"{percent} bootstrap (tokens)")


def test_claims_table_at_90_percent_against_scipy():
    frame = seed_frame()
    table = claims_table(frame, level=0.9)
    assert list(table["comparison"]) == ["topk < dense_total"]
    row = table.iloc[0]
    (low, high), boot = reference(frame, 0.9)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert (row["bootstrap_low"], row["bootstrap_high"]) == pytest.approx(tuple(boot), rel=1e-12)
    assert row["verdict"] == "holds" and high < 0
    shown = claims_display(table)
    assert "90% t-interval (seeds)" in shown and "90% bootstrap (tokens)" in shown
    assert not [column for column in table if column.startswith("95%")]
    at_95 = claims_table(frame).iloc[0]
    assert at_95["ci_low"] < row["ci_low"] and at_95["ci_high"] > row["ci_high"]  # the wider interval


def test_claims_over_training_at_90_percent_against_scipy():
    frame = seed_frame(steps=(0, 10))
    over = claims_over_training(frame, level=0.9)
    assert list(over["step"]) == [0, 10] and set(over["comparison"]) == {"topk < dense_total"}
    for row in over.to_dict("records"):
        (low, high), boot = reference(frame[frame["step"] == row["step"]], 0.9)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-9)
        assert (row["bootstrap_low"], row["bootstrap_high"]) == pytest.approx(tuple(boot), rel=1e-12)
