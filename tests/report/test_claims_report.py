"""The claims of `moe-lightning report` on hand-written run directories with known values: both capacity controls
as arms, t-intervals and bootstrap intervals checked against scipy and numpy on the values written, the n_eff < D
marks, the claims at every probe step, and no claims table when nothing is compared."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moe_lightning.analysis.claims import paper_claims
from moe_lightning.analysis.steps import pca_sampling
from moe_lightning.report import build_report

LAYERS = ("blocks.0.ffn", "blocks.1.ffn")  # layer 1 holds 1.5 × layer 0, so each seed's layer mean is 1.25 × layer 0
STEPS = (0, 10)
SEEDS = (0, 1, 2)
REPLICATES = 40
WIDTH = 4
CLAIM_METRICS = sorted({c.metric for c in paper_claims()})
# σ_max per arm and seed at the last step: top-k well below dense_total, above dense_active; soft noisy.
SIGMA = {
    "topk": [1.0, 1.05, 1.1],
    "soft": [1.5, 0.6, 1.3],
    "dense_total": [2.0, 2.1, 2.05],
    "dense_active": [0.5, 0.52, 0.55],
}


def base_value(arm: str, seed: int, step: int, metric: str) -> float:
    """Layer 0's value: σ_max from SIGMA (top-k above every other arm at step 0), every other metric an arm's
    offset plus a deterministic pseudo-random spread over seeds."""
    if metric == "jac_sigma_max/mean":
        return SIGMA[arm][seed] + (1.5 if step == 0 and arm == "topk" else 0.0)
    offset = {"topk": 0.3, "soft": 0.1, "dense_total": 0.7, "dense_active": 0.4}[arm]
    spread = np.random.default_rng([len(metric), ord(metric[-1]), seed, step, list(SIGMA).index(arm)]).uniform()
    return 0.02 + 0.07 * spread + offset * (metric != "align_mean_offdiag")


def replicates(arm: str, seed: int, step: int, metric: str) -> np.ndarray:
    rng = np.random.default_rng([SEEDS.index(seed), STEPS.index(step), len(metric), len(arm)])
    return base_value(arm, seed, step, metric) + 0.05 * rng.standard_normal(REPLICATES)


def n_eff(arm: str, seed: int) -> float:
    return 3.0 if arm == "topk" and seed < 2 else 40.0  # top-k under-sampled (n_eff < WIDTH) in seeds 0 and 1


def write_run(root: Path, arm: str, seed: int, routing: str, capacity: str | None, bootstrap: bool) -> Path:
    """A sweep job directory: run.json, config.yaml, metrics.csv and geometry/step_*.json for both layers."""
    job = root / f"{arm}-seed{seed}"
    (job / "geometry").mkdir(parents=True)
    (job / "run.json").write_text(json.dumps({"routing": routing, "seed": seed, "family": "mlp", "status": "done"}))
    config = {"routing": routing, **({"capacity_match": capacity} if capacity else {})}
    (job / "config.yaml").write_text(json.dumps({"model": {"init_args": {"config": config}}}))
    rows = []
    for step in STEPS:
        row: dict[str, float] = {"step": step}
        layers = {}
        for index, layer in enumerate(LAYERS):
            scale = 1.0 + 0.5 * index
            row[f"geometry/{layer}/tokens_total"] = 64
            for metric in [*CLAIM_METRICS, "align_ratio"]:
                row[f"geometry/{layer}/{metric}"] = scale * base_value(arm, seed, step, metric)
            pca = {
                site: [{"n_eff": n_eff(arm, seed), "total_weight": 1.0, "eigenvalues": [1.0] * WIDTH}]
                for site in ("input", "hidden", "output")
            }
            layers[layer] = {"dim": WIDTH, "pca": pca}
            if bootstrap:
                values = {m: list(scale * replicates(arm, seed, step, m)) for m in CLAIM_METRICS}
                layers[layer]["bootstrap"] = {"replicates": REPLICATES, "seed": 0, "values": values}
        rows.append(row)
        (job / "geometry" / f"step_{step:07d}.json").write_text(json.dumps({"step": step, "layers": layers}))
    pd.DataFrame(rows).to_csv(job / "metrics.csv", index=False)
    return job


ARMS = {  # arm -> (routing in run.json, capacity_match in config.yaml)
    "topk": ("topk", None),
    "soft": ("soft", None),
    "dense_total": ("dense", "total"),
    "dense_active": ("dense", "active"),
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("claims")
    for arm, (routing, capacity) in ARMS.items():
        for seed in SEEDS:
            write_run(root, arm, seed, routing, capacity, bootstrap=True)
    build_report([str(root)], formats=("md", "csv"))
    return root


def expected(a: str, b: str | None, metric: str, relation: str, step: int = STEPS[-1], threshold: float = 0.1):
    """The claim recomputed from the values written: 95% t-interval (scipy), verdict, bootstrap interval (numpy)."""

    def other(values, seed: int):  # B's layer mean, or the threshold
        return threshold if b is None else 1.25 * values(b, seed, step, metric)

    d = np.array([1.25 * base_value(a, s, step, metric) - other(base_value, s) for s in SEEDS])
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    below, above = ci.high < 0, ci.low > 0
    verdict = "inconclusive" if not (below or above) else ("holds" if below == (relation == "<") else "does not hold")
    boot = np.mean([1.25 * replicates(a, s, step, metric) - other(replicates, s) for s in SEEDS], axis=0)
    return d, ci, verdict, np.quantile(boot, [0.025, 0.975])


def test_claims_against_scipy_and_both_controls(sweep):
    claims = pd.read_csv(sweep / "report" / "claims.csv", keep_default_na=False, na_values=[""])
    assert len(claims) == len(paper_claims()) == 29
    assert set(claims[claims["claim"] == "C1a"]["control"]) == {"dense_total", "dense_active"}
    for row in claims.to_dict("records"):
        words = row["comparison"].split()
        threshold = row["claim"] == "C3"
        relation = "<" if threshold else words[1]
        d, ci, verdict, boot = expected(words[0], None if threshold else words[2], row["metric"], relation)
        assert row["verdict"] == verdict, row
        np.testing.assert_allclose([row["ci_low"], row["ci_high"]], [ci.low, ci.high], rtol=1e-9)
        np.testing.assert_allclose(row["mean_difference"], d.mean(), rtol=1e-12)
        np.testing.assert_allclose(row["effect_size"], d.mean() / d.std(ddof=1), rtol=1e-9)
        np.testing.assert_allclose([row["bootstrap_low"], row["bootstrap_high"]], boot, rtol=1e-9)
        assert row["n seeds"] == 3 and row["bootstrap_replicates"] == REPLICATES
        adjusted = stats.ttest_1samp(d, 0.0).confidence_interval(1 - 0.05 / 29)
        np.testing.assert_allclose([row["bonferroni_low"], row["bonferroni_high"]], [adjusted.low, adjusted.high])
    sigma = claims[claims["metric"] == "jac_sigma_max/mean"].set_index("comparison")
    assert sigma.loc["topk < dense_total", "verdict"] == "holds"  # the cases were built that way
    assert sigma.loc["topk < dense_active", "verdict"] == "does not hold"
    assert sigma.loc["topk > soft", "verdict"] == "inconclusive"
    # Top-k is above dense_total at step 0 only: the claim holds from step 10 on; against dense_active throughout.
    assert sigma.loc["topk < dense_total", "verdict since step"] == 10
    assert sigma.loc["topk < dense_active", "verdict since step"] == 0
    text = (sweep / "report" / "claims.md").read_text()
    assert "29 claim rows were tested" in text and "99.83%" in text and "Not tested against" not in text


def test_undersampled_pca_values_are_marked(sweep):
    claims = pd.read_csv(sweep / "report" / "claims.csv", keep_default_na=False)
    for row in claims.to_dict("records"):
        rests = row["metric"].startswith("pca_") and "topk" in row["comparison"]
        assert row["undersampled"] == rests, row
        if rests:
            assert row["n_eff < D"] == f"topk 2/3 seeds (min n_eff 3 < {WIDTH})"
    results = pd.read_csv(sweep / "report" / "results.csv").set_index("arm")
    assert list(results.index) == ["dense_total", "dense_active", "topk", "soft"]
    assert results.loc["topk", "pca_hidden_effective_rank/mean:undersampled"] == 2
    assert results.loc["soft", "pca_hidden_effective_rank/mean:undersampled"] == 0
    assert "(†2/3)" in (sweep / "report" / "results.md").read_text()


def test_claims_at_every_probe_step(sweep):
    over = pd.read_csv(sweep / "report" / "claims_over_training.csv")
    assert len(over) == 29 * len(STEPS)
    for step in STEPS:
        row = over[(over["comparison"] == "topk < dense_total") & (over["metric"] == "jac_sigma_max/mean")]
        row = row[row["step"] == step].iloc[0]
        d, ci, verdict, boot = expected("topk", "dense_total", "jac_sigma_max/mean", "<", step=step)
        np.testing.assert_allclose([row["ci_low"], row["ci_high"]], [ci.low, ci.high], rtol=1e-9)
        np.testing.assert_allclose([row["bootstrap_low"], row["bootstrap_high"]], boot, rtol=1e-9)
        assert row["verdict"] == verdict and row["n seeds"] == 3


def test_old_runs_without_replicates_or_active_control(tmp_path):
    """Runs from before the bootstrap and the dense_active arm: seed intervals only, dense is dense_total."""
    for arm in ("topk", "dense_total"):
        for seed in SEEDS:
            write_run(tmp_path, arm, seed, ARMS[arm][0], None, bootstrap=False)
    written = build_report([str(tmp_path)])
    claims = pd.read_csv(tmp_path / "report" / "claims.csv")
    assert set(claims["comparison"]) == {
        "topk < dense_total",
        "topk > dense_total",
        "topk align_mean_offdiag < 0.1",
    }
    assert claims["bootstrap_low"].isna().all() and (claims["bootstrap_replicates"] == 0).all()
    row = claims[claims["metric"] == "jac_sigma_max/mean"].iloc[0]
    _, ci, _, _ = expected("topk", "dense_total", "jac_sigma_max/mean", "<")
    np.testing.assert_allclose([row["ci_low"], row["ci_high"]], [ci.low, ci.high], rtol=1e-9)
    assert "Not tested against dense_active" in (tmp_path / "report" / "claims.md").read_text()
    figure = tmp_path / "report" / "claims_over_training.png"
    assert str(figure) in written
    height, width = matplotlib.image.imread(figure).shape[:2]
    assert height > 400 and width > 1000  # 7 panels, 4 to a row
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("<h3>Claims over training</h3>") == page.count('<div class="chart" data-kind="claims"') == 1
    sections = {part.split(">", 1)[1].split("</h2>")[0]: part for part in page.split("<h2 ")[1:]}
    assert all("<table" in sections[name] for name in ("Summary", "Results", "Claims", "Runs"))


def test_single_run_report_has_no_claims_table(tmp_path):
    write_run(tmp_path, "topk", 0, "topk", None, bootstrap=True)
    written = [Path(p).name for p in build_report([str(tmp_path)], formats=("md", "csv", "html"))]
    assert "results.csv" in written and not [name for name in written if name.startswith("claims")]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Claims</h2>" not in page and "inconclusive" not in page


def test_pca_sampling_from_logged_keys_without_a_saved_report():
    key = "geometry/L"
    history = pd.DataFrame(
        {
            f"{key}/pca_hidden_undersampled/e0": [1.0],
            f"{key}/pca_hidden_undersampled/e1": [0.0],
            f"{key}/pca_hidden_undersampled/e2": [1.0],  # an empty expert: no effective rank, not counted
            f"{key}/pca_hidden_effective_rank/e0": [2.5],
            f"{key}/pca_hidden_effective_rank/e1": [3.0],
            f"{key}/pca_hidden_effective_rank/e2": [math.nan],
            f"{key}/pca_hidden_n_eff/e0": [12.0],
            f"{key}/pca_hidden_n_eff/e1": [80.0],
            f"{key}/pca_hidden_n_eff/e2": [0.0],
        },
        index=[5],
    )
    flag, n_eff_min, width = pca_sampling(None, history, key, 5, "hidden")
    assert flag is True and n_eff_min == 12.0 and math.isnan(width)
    flag, n_eff_min, _ = pca_sampling(None, history, key, 5, "input")  # no keys for that site: unknown
    assert flag is None and math.isnan(n_eff_min)


def test_one_seed_per_arm_is_inconclusive_with_undefined_intervals(tmp_path):
    for arm in ("topk", "dense_total"):
        write_run(tmp_path, arm, 0, ARMS[arm][0], None, bootstrap=True)
    build_report([str(tmp_path)], formats=("md", "csv"))
    claims = pd.read_csv(tmp_path / "report" / "claims.csv")
    assert set(claims["verdict"]) == set(claims["verdict (Bonferroni)"]) == {"inconclusive"}
    assert claims["ci_low"].isna().all() and (claims["n seeds"] == 1).all()
    assert claims["note"].str.contains("1 paired seed\\(s\\), need 2").all()
    row = claims[claims["metric"] == "jac_sigma_max/mean"].iloc[0]
    assert row["mean_difference"] == pytest.approx(1.25 * (SIGMA["topk"][0] - SIGMA["dense_total"][0]))
    assert "none was tested" in (tmp_path / "report" / "claims.md").read_text()
