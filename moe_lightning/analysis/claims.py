"""The papers' directional claims as data, and the one loop that pairs their arms by seed and decides each claim
(:mod:`moe_lightning.analysis.decision`), on the final values or at every probe step; with the Bonferroni-adjusted
intervals and the step since which a verdict has held. Pure statistics on DataFrames: the text of the report's
claims table is :mod:`moe_lightning.report.claims_render`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from moe_lightning.analysis.decision import LEVEL, Decision, decide, decide_threshold
from moe_lightning.analysis.intervals import Interval, bonferroni_level, t_interval, verdict
from moe_lightning.analysis.steps import is_flagged

__all__ = [
    "PAPER_CLAIMS",
    "Claim",
    "Evaluation",
    "Side",
    "bonferroni",
    "claims_over_training",
    "comparable",
    "evaluate_claims",
    "paper_claims",
    "verdict_since",
]


@dataclass(frozen=True)
class Claim:
    """One directional claim of the papers (see docs/geometry.md): ``A <relation> B`` on ``metric``, or
    ``A < threshold``."""

    claim: str
    statement: str
    metric: str
    a: str
    relation: str
    b: str | None  # None: threshold claim

    @property
    def comparison(self) -> str:
        return f"{self.a} {self.relation} {self.b}" if self.b is not None else f"{self.a} {self.metric} < threshold"

    def comparison_at(self, threshold: float) -> str:
        """:attr:`comparison` with a threshold claim's threshold written out."""
        return self.comparison if self.b is not None else f"{self.a} {self.metric} < {threshold:g}"


_FLATTER = "MoE is flatter: lower expert σ_max than dense"
_LAYER_FLATTER = "the whole layer map is flatter than dense"
_DECAY = "faster spectral decay than dense"
_RANK = "expert-local representations have higher effective rank than dense ({} site)"
_ALIGN = "expert Jacobians barely align"

# Every MoE-vs-dense claim for top-k and soft, each against both controls (``dense_total``: equal total parameters,
# ``dense_active``: equal active FLOPs); C2 at every PCA site of the probe; C3 and C4 without a control.
PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim("C1a", _FLATTER, "jac_sigma_max/mean", "topk", "<", "dense_total"),
    Claim("C1a", _FLATTER, "jac_sigma_max/mean", "topk", "<", "dense_active"),
    Claim("C1a", _FLATTER, "jac_sigma_max/mean", "soft", "<", "dense_total"),
    Claim("C1a", _FLATTER, "jac_sigma_max/mean", "soft", "<", "dense_active"),
    Claim("C1a (control)", _LAYER_FLATTER, "layer_jac_sigma_max", "topk", "<", "dense_total"),
    Claim("C1a (control)", _LAYER_FLATTER, "layer_jac_sigma_max", "topk", "<", "dense_active"),
    Claim("C1a (control)", _LAYER_FLATTER, "layer_jac_sigma_max", "soft", "<", "dense_total"),
    Claim("C1a (control)", _LAYER_FLATTER, "layer_jac_sigma_max", "soft", "<", "dense_active"),
    Claim("C1b", _DECAY, "jac_decay_slope/mean", "topk", ">", "dense_total"),
    Claim("C1b", _DECAY, "jac_decay_slope/mean", "topk", ">", "dense_active"),
    Claim("C1b", _DECAY, "jac_decay_slope/mean", "soft", ">", "dense_total"),
    Claim("C1b", _DECAY, "jac_decay_slope/mean", "soft", ">", "dense_active"),
    Claim("C2", _RANK.format("input"), "pca_input_effective_rank/mean", "topk", ">", "dense_total"),
    Claim("C2", _RANK.format("input"), "pca_input_effective_rank/mean", "topk", ">", "dense_active"),
    Claim("C2", _RANK.format("input"), "pca_input_effective_rank/mean", "soft", ">", "dense_total"),
    Claim("C2", _RANK.format("input"), "pca_input_effective_rank/mean", "soft", ">", "dense_active"),
    Claim("C2", _RANK.format("hidden"), "pca_hidden_effective_rank/mean", "topk", ">", "dense_total"),
    Claim("C2", _RANK.format("hidden"), "pca_hidden_effective_rank/mean", "topk", ">", "dense_active"),
    Claim("C2", _RANK.format("hidden"), "pca_hidden_effective_rank/mean", "soft", ">", "dense_total"),
    Claim("C2", _RANK.format("hidden"), "pca_hidden_effective_rank/mean", "soft", ">", "dense_active"),
    Claim("C2", _RANK.format("output"), "pca_output_effective_rank/mean", "topk", ">", "dense_total"),
    Claim("C2", _RANK.format("output"), "pca_output_effective_rank/mean", "topk", ">", "dense_active"),
    Claim("C2", _RANK.format("output"), "pca_output_effective_rank/mean", "soft", ">", "dense_total"),
    Claim("C2", _RANK.format("output"), "pca_output_effective_rank/mean", "soft", ">", "dense_active"),
    Claim("C3", _ALIGN, "align_mean_offdiag", "topk", "<", None),
    Claim("C3", _ALIGN, "align_mean_offdiag", "soft", "<", None),
    Claim("C4", "top-k is sharper than soft", "jac_sigma_max/mean", "topk", ">", "soft"),
    Claim("C4", "top-k is lower-rank than soft (Jacobian)", "jac_effective_rank/mean", "topk", "<", "soft"),
    Claim("C4", "top-k is lower-rank than soft (hidden PCA)", "pca_hidden_effective_rank/mean", "topk", "<", "soft"),
)


def paper_claims() -> list[Claim]:
    """:data:`PAPER_CLAIMS` as a list, in their order."""
    return list(PAPER_CLAIMS)


@dataclass
class Side:
    """One arm's per-seed values of one metric (at one step)."""

    values: dict[int, float] = field(default_factory=dict)
    replicates: dict[int, Any] = field(default_factory=dict)
    undersampled: dict[int, tuple[float, float]] = field(default_factory=dict)  # seed -> (min n_eff, width)

    def add(self, row: Any) -> None:
        seed = int(row.seed)
        self.values[seed] = float(row.value)
        if row.replicates is not None:
            self.replicates[seed] = row.replicates
        if is_flagged(row.undersampled):
            self.undersampled[seed] = (float(row.min_n_eff), float(row.width))


def _with_arms(values: pd.DataFrame) -> pd.DataFrame:
    """Frames from before the arms existed have ``routing`` only: ``dense`` there is ``dense_total``."""
    if "arm" not in values:
        values = values.assign(arm=values["routing"].replace({"dense": "dense_total"}))
    for column, default in (("replicates", None), ("undersampled", None), ("min_n_eff", math.nan)):
        if column not in values:
            values = values.assign(**{column: default})
    if "width" not in values:
        values = values.assign(width=math.nan)
    return values


def _sides(values: pd.DataFrame, keys: list[str]) -> dict[tuple, Side]:
    """``(*keys, arm, metric) -> Side`` over the rows with a seed."""
    sides: dict[tuple, Side] = {}
    rows = values[values["seed"].notna()]
    for row in rows.itertuples(index=False):
        key = (*(getattr(row, k) for k in keys), row.arm, row.metric)
        sides.setdefault(key, Side()).add(row)
    return sides


@dataclass(frozen=True)
class Evaluation:
    """One claim decided on one family and layer (and probe step).

    Attributes:
        family, layer: the group of rows the arms were paired in.
        step: the probe step, or None for final values.
        claim: the claim.
        comparison: :meth:`Claim.comparison_at` the threshold.
        side_a, side_b: the arms' values (``side_b`` None for a threshold claim).
        align_ratio: seed -> ``align_ratio`` of a threshold claim's arm (empty for a paired claim).
        decision: the :class:`~moe_lightning.analysis.decision.Decision`.
    """

    family: Any
    layer: Any
    step: int | None
    claim: Claim
    comparison: str
    side_a: Side
    side_b: Side | None
    align_ratio: dict[int, float]
    decision: Decision

    @property
    def relation(self) -> str:
        """The relation the decision tested: a threshold claim is ``A − threshold < 0``."""
        return "<" if self.claim.b is None else self.claim.relation


def _decide(claim: Claim, side_a: Side, side_b: Side | None, threshold: float, level: float) -> Decision:
    if side_b is None:
        return decide_threshold(side_a.values, threshold, level, side_a.replicates or None)
    return decide(side_a.values, side_b.values, claim.relation, level, side_a.replicates or None, side_b.replicates)


def evaluate_claims(
    values: pd.DataFrame, threshold: float, level: float = LEVEL, over_steps: bool = False
) -> list[Evaluation]:
    """Pair the arms of every claim of :data:`PAPER_CLAIMS` by seed and decide it: the one loop behind the claims
    table and the claims over training.

    Args:
        values: per-seed values with columns ``family, layer, seed, metric, value`` and ``arm`` (or ``routing``),
            optionally ``step``, ``replicates``, ``undersampled``, ``min_n_eff`` and ``width``.
        threshold: the absolute threshold of the threshold claims (C3).
        level: coverage of the deciding t-interval and the bootstrap interval.
        over_steps: decide at every probe step (seeds paired within a step) instead of once per family and layer.

    Returns:
        One :class:`Evaluation` per claim, family, layer (and step) at which every arm of the claim has rows,
        ordered by family and layer as first met, then claim, then step.
    """
    # A threshold claim's note gives its arm's alignment as a ratio to chance, so that metric comes along.
    metrics = {c.metric for c in PAPER_CLAIMS} | {"align_ratio"}
    values = _with_arms(values[values["metric"].isin(metrics)])
    sides = _sides(values, ["family", "layer", "step"] if over_steps else ["family", "layer"])
    steps: list[int | None] = sorted({int(s) for s in values["step"]}) if over_steps else [None]
    evaluations = []
    for family, layer in dict.fromkeys(zip(values["family"], values["layer"], strict=True)):
        for claim in PAPER_CLAIMS:
            for step in steps:
                key = (family, layer) if step is None else (family, layer, step)
                side_a = sides.get((*key, claim.a, claim.metric))
                side_b = None if claim.b is None else sides.get((*key, claim.b, claim.metric))
                if side_a is None or (claim.b is not None and side_b is None):
                    continue
                ratio = sides.get((*key, claim.a, "align_ratio"), Side()).values if side_b is None else {}
                decision = _decide(claim, side_a, side_b, threshold, level)
                comparison = claim.comparison_at(threshold)
                evaluations.append(Evaluation(family, layer, step, claim, comparison, side_a, side_b, ratio, decision))
    return evaluations


def bonferroni(evaluations: list[Evaluation], level: float) -> tuple[int, float, list[Interval], list[str]]:
    """The Bonferroni correction over the evaluations: the number ``m`` of those with at least 2 paired seeds, the
    level ``1 − (1 − level) / m``, and each evaluation's t-interval and verdict at that level."""
    tests = int(sum(len(e.decision.seeds) >= 2 for e in evaluations))
    adjusted = bonferroni_level(level, tests)
    strict = [t_interval(e.decision.differences, adjusted) for e in evaluations]
    verdicts = [verdict(i, e.relation) for i, e in zip(strict, evaluations, strict=True)]
    return tests, adjusted, strict, verdicts


def comparable(table: pd.DataFrame) -> bool:
    """Whether a claims table compares anything: some claim between two arms has a paired seed."""
    if table.empty:
        return False
    return bool((table["paired"] & (table["n seeds"] > 0)).any())


OVER_TRAINING_COLUMNS = [
    "family",
    "layer",
    "claim",
    "comparison",
    "metric",
    "step",
    "n seeds",
    "mean_difference",
    "ci_low",
    "ci_high",
    "bootstrap_low",
    "bootstrap_high",
    "effect_size",
    "verdict",
    "undersampled",
    "paired",
]


def claims_over_training(steps: pd.DataFrame, threshold: float = 0.1, level: float = LEVEL) -> pd.DataFrame:
    """The claims at every probe step: the paired difference, its t-interval over seeds and bootstrap interval.

    Args:
        steps: the output of :func:`~moe_lightning.analysis.steps.step_values` (all steps).
        threshold: the absolute threshold of C3.
        level: coverage of the intervals.

    Returns:
        Columns ``family, layer, claim, comparison, metric, step, n seeds, mean_difference, ci_low, ci_high,
        bootstrap_low, bootstrap_high, effect_size, verdict, undersampled, paired``; one row per claim, family, layer
        and step at which its arms were both probed (seeds are paired within a step).
    """
    if steps.empty:
        return pd.DataFrame(columns=OVER_TRAINING_COLUMNS)
    rows = []
    for evaluation in evaluate_claims(steps, threshold, level, over_steps=True):
        decision, side_a, side_b = evaluation.decision, evaluation.side_a, evaluation.side_b
        if side_b is not None and not decision.seeds:
            continue  # a step at which the two arms share no seed compares nothing
        boot = decision.bootstrap
        under = any(s in side_a.undersampled or (side_b and s in side_b.undersampled) for s in decision.seeds)
        rows.append(
            {
                "family": evaluation.family,
                "layer": evaluation.layer,
                "claim": evaluation.claim.claim,
                "comparison": evaluation.comparison,
                "metric": evaluation.claim.metric,
                "step": evaluation.step,
                "n seeds": len(decision.seeds),
                "mean_difference": decision.mean_difference,
                "ci_low": decision.interval.low,
                "ci_high": decision.interval.high,
                "bootstrap_low": math.nan if boot is None else boot.low,
                "bootstrap_high": math.nan if boot is None else boot.high,
                "effect_size": decision.effect_size,
                "verdict": decision.verdict,
                "undersampled": bool(under),
                "paired": side_b is not None,
            }
        )
    return pd.DataFrame(rows, columns=OVER_TRAINING_COLUMNS)


def verdict_since(claims: pd.DataFrame, training: pd.DataFrame) -> pd.DataFrame:
    """Add to ``claims`` the column ``verdict since step``: the first probe step from which the claim's verdict in
    ``training`` (:func:`claims_over_training`) stays its final one at every later step (empty when the claim was
    not probed over training)."""
    if claims.empty:
        return claims
    since = {}
    keys = ["family", "layer", "claim", "comparison", "metric"]
    for key, rows in training.sort_values("step").groupby(keys, sort=False):
        verdicts, steps = list(rows["verdict"]), [int(s) for s in rows["step"]]
        first = len(verdicts) - 1
        while first > 0 and verdicts[first - 1] == verdicts[-1]:
            first -= 1
        since[key] = (verdicts[-1], steps[first])
    column = []
    for row in claims[keys + ["verdict"]].itertuples(index=False):
        found = since.get(tuple(row[:-1]))
        column.append(str(found[1]) if found and found[0] == row[-1] else "")
    claims = claims.copy()
    claims.insert(claims.columns.get_loc("verdict (Bonferroni)") + 1, "verdict since step", column)
    return claims
