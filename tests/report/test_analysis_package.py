"""The split between ``moe_lightning.analysis`` (runs and their statistics) and ``moe_lightning.report``
(rendering): analysis never draws, the 0.1 names still read from the report for one release with a warning, the
claims table and the claims over training come out of one evaluation loop, and every interval label follows the
level."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moe_lightning.analysis as analysis
import moe_lightning.report as report
from moe_lightning.analysis import claims as claims_module
from moe_lightning.analysis import claims_over_training
from moe_lightning.report.claims_render import claims_table

ANALYSIS = Path(analysis.__file__).parent
# What the analysis may not import: the rendering, its plotting libraries, and Lightning.
RENDERING = ("moe_lightning.report", "matplotlib", "plotly", "wandb_workspaces", "lightning", "pytorch_lightning")
# The names 0.1 documented in moe_lightning.report.
NAMES_0_1 = (
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


def test_the_analysis_never_imports_the_rendering():
    offenders = []
    for path in sorted(ANALYSIS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name} imports {n}" for n in names if n.startswith(RENDERING)]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", NAMES_0_1)
def test_a_0_1_name_reads_from_the_report_with_a_warning_naming_its_new_path(name):
    with pytest.warns(
        FutureWarning, match=rf"moe_lightning\.report\.{name} has moved to moe_lightning\.analysis\.{name}"
    ):
        value = getattr(report, name)
    assert value is getattr(analysis, name)
    assert name not in report.__all__ and name in analysis.__all__
    assert name not in vars(report)  # not kept: every read warns


def test_the_old_import_statement_still_works():
    with pytest.warns(FutureWarning, match=r"moe_lightning\.analysis\.decide\b"):
        from moe_lightning.report import decide
    assert decide is analysis.decide


def test_only_the_0_1_names_are_aliased():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.build_report  # noqa: B018 - a rendering name reads without a warning
    for name in ("evaluate_claims", "paper_claims", "step_values", "Run", "results_table"):
        with pytest.raises(AttributeError, match=f"no attribute {name!r}"):
            getattr(report, name)


def arms_frame(step: int = 100) -> pd.DataFrame:
    """σ_max of top-k, soft and dense_total over 4 seeds (with replicates), and top-k's alignment for C3."""
    rows = []
    arms = {"topk": [1.0, 1.2, 0.9, 1.4], "soft": [1.5, 1.1, 1.6, 1.3], "dense_total": [2.0, 1.7, 2.3, 1.9]}
    for arm, values in arms.items():
        for seed, value in enumerate(values):
            rng = np.random.default_rng([seed, len(arm)])
            base = {"family": "mlp", "layer": "mean", "seed": seed, "step": step, "arm": arm}
            replicates = value + 0.2 * rng.standard_normal(40)
            rows.append({**base, "metric": "jac_sigma_max/mean", "value": value, "replicates": replicates})
            if arm == "topk":
                rows.append({**base, "metric": "align_mean_offdiag", "value": 0.05 + 0.01 * seed, "replicates": None})
    return pd.DataFrame(rows)


def test_the_claims_table_and_the_claims_over_training_are_one_evaluation_loop(monkeypatch):
    """Both tables decide every claim through ``evaluate_claims``: on one probe step they make the same decisions,
    with the same arguments, and give the same numbers."""
    calls: dict[str, list] = {"table": [], "training": []}
    decide = claims_module._decide
    target = "table"

    def spy(claim, side_a, side_b, threshold, level):
        calls[target].append((claim, side_a.values, None if side_b is None else side_b.values, threshold, level))
        return decide(claim, side_a, side_b, threshold, level)

    monkeypatch.setattr(claims_module, "_decide", spy)
    frame = arms_frame()
    table = claims_table(frame, threshold=0.1, level=0.9)
    target = "training"
    training = claims_over_training(frame, threshold=0.1, level=0.9)
    assert calls["table"] == calls["training"] and len(calls["table"]) == len(table) == len(training) >= 4
    assert any(claim.b is None for claim, *_ in calls["table"])  # the threshold claim went through it too
    columns = ["claim", "comparison", "metric", "mean_difference", "ci_low", "ci_high", "bootstrap_low"]
    columns += ["bootstrap_high", "effect_size", "verdict", "paired"]
    pd.testing.assert_frame_equal(
        table[columns].reset_index(drop=True), training[columns].reset_index(drop=True), check_dtype=False
    )


@pytest.mark.parametrize(("level", "percent"), [(0.9, "90%"), (0.975, "97.5%")])
def test_the_claims_over_training_figure_names_its_level(level, percent, tmp_path, monkeypatch):
    from moe_lightning.report import figures, plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path, title, **_: drawn.append(figure) or path)
    training = claims_over_training(arms_frame(), level=level)
    assert figures.claims_over_training_figure(training, str(tmp_path / "claims.png"), level=level) is not None
    labels = [text.get_text() for legend in drawn[0].legends for text in legend.get_texts()]
    assert f"{percent} t-interval over seeds" in labels and f"{percent} bootstrap over probe tokens" in labels
    assert not [label for label in labels if "95%" in label]
