"""The papers' directional claims tested on per-seed values: the seed-paired difference with its t-interval over
seeds, the within-seed bootstrap interval over probe tokens, the standardised effect size, the verdict the
t-interval gives, a Bonferroni-adjusted verdict beside it, and the same at every probe step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from moe_lightning.common.choices import PCA_SITES
from moe_lightning.report.format import format_interval, format_mean_std, format_number, summarize
from moe_lightning.report.intervals import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    RELATIONS,
    Interval,
    bonferroni_level,
    effect_size,
    percentile_interval,
    t_interval,
    verdict,
)
from moe_lightning.report.runs import CONTROLS
from moe_lightning.report.steps import is_flagged

__all__ = [
    "DECISION_RULE",
    "DOES_NOT_HOLD",
    "HOLDS",
    "INCONCLUSIVE",
    "Claim",
    "Decision",
    "claims_display",
    "claims_over_training",
    "claims_table",
    "comparable",
    "verdict_since",
    "decide",
    "decide_threshold",
    "multiple_comparison_note",
    "paper_claims",
]

LEVEL = 0.95
DECISION_RULE = (
    'Decision rule. For a claim "A < B" (or "A > B") the runs of A and B are paired by seed (seeds present in both '
    "with a finite value on each side; a seed with a NaN is left out and named in the note) and d_s = A_s − B_s. "
    "The verdict comes from the 95% t-interval over seeds of the mean paired difference, mean(d) ± "
    "t_{0.975, n−1} · sd(d) / √n (sd: sample std, ddof=1, over the n paired seeds): the claim holds when the "
    "interval lies entirely on the claimed side of 0, does not hold when it lies entirely on the other side, and is "
    "inconclusive when it contains 0, or when fewer than 2 seeds are paired (the interval is then undefined). "
    'Threshold claims (C3, "A < threshold") take d_s = A_s − threshold the same way. The bootstrap interval '
    "beside it is the 2.5–97.5 percentile range, over the probe's token resamples, of the mean over seeds of d_s "
    "(resample b of both arms drawn alike): it shows how much of the difference is probe-token noise within the "
    "trained models, and it does not decide. Effect size: mean(d) / sd(d), the mean paired difference in units of "
    "the seed-to-seed standard deviation of the paired differences (Cohen's d_z). A PCA value marked n_eff < D "
    "rests on an expert whose effective sample size (Σw)²/Σw² is below the width of the site's vectors, so its "
    "covariance is rank-deficient by sampling alone."
)


# ---------------------------------------------------------------------------------------------------------------
# One decision
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide` or :func:`decide_threshold`.

    Attributes:
        verdict: ``"holds"``, ``"does not hold"`` or ``"inconclusive"``, from the t-interval.
        seeds: the seeds used (paired seeds with finite values on both sides).
        mean_difference: mean of ``d_s = A_s − B_s`` (or of ``A_s − threshold``).
        std_a, std_b: sample std of A and B over those seeds (``std_b`` NaN for threshold claims).
        reason: why the verdict is inconclusive, and which seeds were left out; empty otherwise.
        differences: ``d_s`` per used seed.
        interval: the t-interval over seeds of the mean difference (ends NaN for fewer than 2 seeds).
        effect_size: ``mean(d) / sd(d)`` (Cohen's d_z).
        bootstrap: the percentile interval of the mean difference over the probe's token resamples (None when a
            used seed has no replicates).
        bootstrap_per_seed: ``(seed, low, high)`` percentile interval of each seed's own ``d_s``.
    """

    verdict: str
    seeds: tuple[int, ...]
    mean_difference: float
    std_a: float
    std_b: float
    reason: str = ""
    differences: tuple[float, ...] = ()
    interval: Interval = field(default_factory=lambda: Interval(math.nan, math.nan, math.nan, LEVEL, 0))
    effect_size: float = math.nan
    bootstrap: Interval | None = None
    bootstrap_per_seed: tuple[tuple[int, float, float], ...] = ()

    @property
    def std_difference(self) -> float:
        """Sample std (ddof=1) of the paired differences; NaN for fewer than 2 seeds."""
        return float(np.std(self.differences, ddof=1)) if len(self.differences) >= 2 else math.nan


def _replicate_differences(
    seeds: tuple[int, ...], a: Mapping[int, Any] | None, b: Mapping[int, Any] | float
) -> dict[int, np.ndarray]:
    """Seed -> replicate-wise ``A^(b) − B^(b)`` for the seeds with replicates on both sides (``b`` a number for a
    threshold). Replicates are i.i.d. draws, so two sides with different counts are cut to the shorter."""
    out: dict[int, np.ndarray] = {}
    for seed in seeds:
        ra = None if a is None else a.get(seed)
        rb = b if isinstance(b, float) else b.get(seed)
        if ra is None or rb is None:
            continue
        ra = np.asarray(ra, dtype=float)
        if isinstance(rb, float):
            out[seed] = ra - rb
        else:
            rb = np.asarray(rb, dtype=float)
            length = min(ra.size, rb.size)
            out[seed] = ra[:length] - rb[:length]
    return out


def _decide(
    differences: dict[int, float],
    replicates: dict[int, np.ndarray],
    relation: str,
    level: float,
    std_a: float,
    std_b: float,
    notes: list[str],
) -> Decision:
    seeds = tuple(sorted(differences))
    d = np.asarray([differences[s] for s in seeds], dtype=float)
    interval = t_interval(d, level)
    outcome = verdict(interval, relation)
    if len(seeds) < 2:
        notes = [f"{len(seeds)} paired seed(s), need 2", *notes]
    elif outcome == INCONCLUSIVE:
        notes = ["interval contains 0", *notes]
    per_seed: tuple[tuple[int, float, float], ...] = ()
    combined = None
    if replicates:
        per_seed = tuple(
            (s, (i := percentile_interval(replicates[s], level)).low, i.high) for s in seeds if s in replicates
        )
        missing = [s for s in seeds if s not in replicates]
        if missing:
            notes.append(f"bootstrap: no replicates for seed(s) {', '.join(map(str, missing))}")
        elif seeds:
            length = min(replicates[s].size for s in seeds)
            combined = percentile_interval(np.mean([replicates[s][:length] for s in seeds], axis=0), level)
            if combined.n < length:
                notes.append(f"bootstrap: {combined.n}/{length} replicates defined")
    return Decision(
        verdict=outcome,
        seeds=seeds,
        mean_difference=interval.mean,
        std_a=std_a,
        std_b=std_b,
        reason="; ".join(notes),
        differences=tuple(float(x) for x in d),
        interval=interval,
        effect_size=effect_size(d),
        bootstrap=combined,
        bootstrap_per_seed=per_seed,
    )


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


def decide(
    a: Mapping[int, float],
    b: Mapping[int, float],
    relation: str,
    level: float = LEVEL,
    replicates_a: Mapping[int, Any] | None = None,
    replicates_b: Mapping[int, Any] | None = None,
) -> Decision:
    """Apply the decision rule (:data:`DECISION_RULE`) to the claim ``A <relation> B``.

    Args:
        a: seed -> value of A.
        b: seed -> value of B.
        relation: ``"<"`` or ``">"``.
        level: coverage of the deciding t-interval.
        replicates_a: seed -> bootstrap replicates of A over probe tokens, for the bootstrap interval; None
            leaves it out.
        replicates_b: the same for B (replicate i of A and of B on the same token resample when both arms were
            probed on the same tokens).

    Returns:
        The :class:`Decision`.

    Example:
        >>> decide({0: 1.0, 1: 1.1, 2: 1.2}, {0: 2.0, 1: 2.2, 2: 2.3}, "<").verdict
        'holds'
    """
    if relation not in RELATIONS:
        raise ValueError(f"relation={relation!r} is not supported; allowed values: '<', '>'")
    common = sorted(set(a) & set(b))
    bad = [s for s in common if not (math.isfinite(a[s]) and math.isfinite(b[s]))]
    seeds = tuple(s for s in common if s not in bad)
    notes = [f"NaN in seed(s) {', '.join(map(str, bad))}, left out"] if bad else []
    differences = {s: float(a[s]) - float(b[s]) for s in seeds}
    replicates = _replicate_differences(seeds, replicates_a, replicates_b or {}) if replicates_a else {}
    return _decide(
        differences, replicates, relation, level, _std([a[s] for s in seeds]), _std([b[s] for s in seeds]), notes
    )


def decide_threshold(
    values: Mapping[int, float],
    threshold: float,
    level: float = LEVEL,
    replicates: Mapping[int, Any] | None = None,
) -> Decision:
    """Apply the decision rule to the claim "value < threshold" (C3): ``d_s = value_s − threshold``.

    Args:
        values: seed -> value.
        threshold: the absolute threshold.
        level: coverage of the deciding t-interval.
        replicates: seed -> bootstrap replicates of the value, for the bootstrap interval.

    Returns:
        The :class:`Decision` (``mean_difference`` is the mean of ``value − threshold``).
    """
    bad = [s for s in sorted(values) if not math.isfinite(values[s])]
    seeds = tuple(s for s in sorted(values) if s not in bad)
    notes = [f"NaN in seed(s) {', '.join(map(str, bad))}, left out"] if bad else []
    differences = {s: float(values[s]) - threshold for s in seeds}
    reps = _replicate_differences(seeds, replicates, float(threshold)) if replicates else {}
    return _decide(differences, reps, "<", level, _std([values[s] for s in seeds]), math.nan, notes)


# ---------------------------------------------------------------------------------------------------------------
# The claims
# ---------------------------------------------------------------------------------------------------------------


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


def paper_claims() -> list[Claim]:
    """C1a, C1b, C2, C3 and C4 as rows: every MoE-vs-dense claim for top-k and soft, each against both controls
    (``dense_total``: equal total parameters, ``dense_active``: equal active FLOPs); C3 and C4 without a control."""
    claims: list[Claim] = []

    def against_controls(claim: str, statement: str, metric: str, relation: str) -> None:
        for moe in ("topk", "soft"):
            for control in CONTROLS:
                claims.append(Claim(claim, statement, metric, moe, relation, control))

    against_controls("C1a", "MoE is flatter: lower expert σ_max than dense", "jac_sigma_max/mean", "<")
    against_controls("C1a (control)", "the whole layer map is flatter than dense", "layer_jac_sigma_max", "<")
    against_controls("C1b", "faster spectral decay than dense", "jac_decay_slope/mean", ">")
    for site in PCA_SITES:
        against_controls(
            "C2",
            f"expert-local representations have higher effective rank than dense ({site} site)",
            f"pca_{site}_effective_rank/mean",
            ">",
        )
    for moe in ("topk", "soft"):
        claims.append(Claim("C3", "expert Jacobians barely align", "align_mean_offdiag", moe, "<", None))
    claims.append(Claim("C4", "top-k is sharper than soft", "jac_sigma_max/mean", "topk", ">", "soft"))
    claims.append(
        Claim("C4", "top-k is lower-rank than soft (Jacobian)", "jac_effective_rank/mean", "topk", "<", "soft")
    )
    claims.append(
        Claim("C4", "top-k is lower-rank than soft (hidden PCA)", "pca_hidden_effective_rank/mean", "topk", "<", "soft")
    )
    return claims


@dataclass
class _Side:
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


def _sides(values: pd.DataFrame, keys: list[str]) -> dict[tuple, _Side]:
    """``(*keys, arm, metric) -> _Side`` over the rows with a seed."""
    sides: dict[tuple, _Side] = {}
    rows = values[values["seed"].notna()]
    for row in rows.itertuples(index=False):
        key = (*(getattr(row, k) for k in keys), row.arm, row.metric)
        sides.setdefault(key, _Side()).add(row)
    return sides


def _undersampled_text(label: str, side: _Side, seeds: tuple[int, ...]) -> str:
    hit = [s for s in seeds if s in side.undersampled]
    if not hit:
        return ""
    n_eff, width = min((side.undersampled[s] for s in hit), key=lambda p: p[0] / p[1] if p[1] > 0 else p[0])
    against = f" < {format_number(width)}" if math.isfinite(width) else ""
    return f"{label} {len(hit)}/{len(seeds)} seeds (min n_eff {format_number(n_eff)}{against})"


def _decide_claim(claim: Claim, side_a: _Side, side_b: _Side | None, threshold: float, level: float) -> Decision:
    if side_b is None:
        return decide_threshold(side_a.values, threshold, level, side_a.replicates or None)
    return decide(side_a.values, side_b.values, claim.relation, level, side_a.replicates or None, side_b.replicates)


def claims_table(values: pd.DataFrame, threshold: float = 0.1, level: float = LEVEL) -> pd.DataFrame:
    """Evaluate :func:`paper_claims` on per-seed final values.

    A claim gets a row when its arms have runs in the table (a report without ``dense_active`` runs has no rows
    against that control). The Bonferroni columns use the t-interval at ``1 − (1 − level) / m``, ``m`` being the
    number of rows with at least 2 paired seeds.

    Args:
        values: the output of :func:`~moe_lightning.report.tables.seed_values` (per layer rows when
            ``layer_mode="each"``).
        threshold: the absolute threshold of C3 on ``align_mean_offdiag``.
        level: coverage of the deciding t-interval.

    Returns:
        One row per claim, comparison, family and layer: the display columns (``A``, ``B`` as mean ± std, ``mean
        difference``, the intervals, ``effect size``, ``n seeds``, ``verdict``, ``verdict (Bonferroni)``,
        ``n_eff < D``, ``note``) and raw ones (``mean_difference``, ``ci_low``, ``ci_high``, ``bootstrap_low``,
        ``bootstrap_high``, ``bootstrap_replicates``, ``bootstrap_per_seed``, ``effect_size``,
        ``std_difference``, ``level``, ``bonferroni_level``, ``bonferroni_low``, ``bonferroni_high``,
        ``undersampled``, ``seeds``).
    """
    if values.empty:
        return pd.DataFrame()
    values = _with_arms(values[values["metric"].isin({c.metric for c in paper_claims()} | {"align_ratio"})])
    sides = _sides(values, ["family", "layer"])
    rows, decisions = [], []
    for family, layer in dict.fromkeys(zip(values["family"], values["layer"], strict=True)):
        for claim in paper_claims():
            side_a = sides.get((family, layer, claim.a, claim.metric))
            side_b = None if claim.b is None else sides.get((family, layer, claim.b, claim.metric))
            if side_a is None or (claim.b is not None and side_b is None):
                continue
            decision = _decide_claim(claim, side_a, side_b, threshold, level)
            used = decision.seeds
            a_text = format_mean_std(*summarize([side_a.values[s] for s in used]))
            if side_b is None:
                ratio = sides.get((family, layer, claim.a, "align_ratio"), _Side()).values
                comparison, b_text = f"{claim.a} {claim.metric} < {threshold:g}", f"threshold {threshold:g}"
                note = f"ratio to chance: {format_mean_std(*summarize([ratio.get(s, math.nan) for s in used]))}"
            else:
                comparison, b_text = claim.comparison, format_mean_std(*summarize([side_b.values[s] for s in used]))
                note = ""
            under = "; ".join(
                t
                for t in (
                    _undersampled_text(claim.a, side_a, used),
                    "" if side_b is None else _undersampled_text(str(claim.b), side_b, used),
                )
                if t
            )
            boot = decision.bootstrap
            rows.append(
                {
                    "family": family,
                    "layer": layer,
                    "claim": claim.claim,
                    "statement": claim.statement,
                    "metric": claim.metric,
                    "comparison": comparison,
                    "control": claim.b if claim.b in CONTROLS else "",
                    "A": a_text,
                    "B": b_text,
                    "mean difference": format_number(decision.mean_difference),
                    "95% t-interval (seeds)": format_interval(decision.interval.low, decision.interval.high),
                    "95% bootstrap (tokens)": "n/a" if boot is None else format_interval(boot.low, boot.high),
                    "effect size d_z": format_number(decision.effect_size),
                    "n seeds": len(used),
                    "verdict": decision.verdict,
                    "n_eff < D": under,
                    "note": "; ".join(t for t in (note, decision.reason) if t),
                    "mean_difference": decision.mean_difference,
                    "ci_low": decision.interval.low,
                    "ci_high": decision.interval.high,
                    "bootstrap_low": math.nan if boot is None else boot.low,
                    "bootstrap_high": math.nan if boot is None else boot.high,
                    "bootstrap_replicates": 0 if boot is None else boot.n,
                    "bootstrap_per_seed": " ".join(
                        f"{s}:{format_interval(lo, hi)}" for s, lo, hi in decision.bootstrap_per_seed
                    ),
                    "effect_size": decision.effect_size,
                    "std_difference": decision.std_difference,
                    "level": level,
                    "undersampled": bool(under),
                    "paired": claim.b is not None,
                    "seeds": " ".join(str(s) for s in used),
                }
            )
            decisions.append((claim, decision))
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    tests = int(sum(len(d.seeds) >= 2 for _, d in decisions))
    adjusted = bonferroni_level(level, tests)
    strict = [t_interval(d.differences, adjusted) for _, d in decisions]
    relations = ["<" if c.b is None else c.relation for c, _ in decisions]
    table.insert(
        table.columns.get_loc("verdict") + 1,
        "verdict (Bonferroni)",
        [verdict(i, r) for i, r in zip(strict, relations, strict=True)],
    )
    table["bonferroni_level"] = adjusted
    table["bonferroni_low"] = [i.low for i in strict]
    table["bonferroni_high"] = [i.high for i in strict]
    table["tests"] = tests
    return table


def comparable(table: pd.DataFrame) -> bool:
    """Whether a claims table compares anything: some claim between two arms has a paired seed."""
    if table.empty:
        return False
    return bool((table["paired"] & (table["n seeds"] > 0)).any())


def multiple_comparison_note(table: pd.DataFrame) -> str:
    """How many claims were tested and the Bonferroni-adjusted level, as one paragraph."""
    if table.empty:
        return ""
    tests, adjusted = int(table["tests"].iloc[0]), float(table["bonferroni_level"].iloc[0])
    level = float(table["level"].iloc[0])
    if tests == 0:
        return (
            "Multiple comparisons: no claim row has 2 paired seeds, so none was tested; every verdict is inconclusive."
        )
    return (
        f"Multiple comparisons: {tests} claim rows were tested (rows with at least 2 paired seeds). Each verdict "
        f"alone is at the {level:.0%} level, so among {tests} tests about {tests * (1 - level):.1f} intervals are "
        f"expected to miss their true difference by chance. The column 'verdict (Bonferroni)' decides with the "
        f"{adjusted:.2%} t-interval (1 − {1 - level:g}/{tests}), which keeps the chance that any of the {tests} "
        f"intervals misses below {1 - level:g}."
    )


def claims_display(table: pd.DataFrame) -> pd.DataFrame:
    """The claims table for people (no raw columns; family and layer only when they vary)."""
    if table.empty:
        return table
    columns = [
        "claim",
        "statement",
        "metric",
        "comparison",
        "A",
        "B",
        "mean difference",
        "95% t-interval (seeds)",
        "95% bootstrap (tokens)",
        "effect size d_z",
        "n seeds",
        "verdict",
        "verdict (Bonferroni)",
        "verdict since step",
        "n_eff < D",
        "note",
    ]
    columns = [c for c in columns if c in table]
    if len(set(table["layer"])) > 1:
        columns.insert(0, "layer")
    if len(set(table["family"])) > 1:
        columns.insert(0, "family")
    return table[columns]


# ---------------------------------------------------------------------------------------------------------------
# Over training
# ---------------------------------------------------------------------------------------------------------------


def claims_over_training(steps: pd.DataFrame, threshold: float = 0.1, level: float = LEVEL) -> pd.DataFrame:
    """The claims at every probe step: the paired difference, its t-interval over seeds and bootstrap interval.

    Args:
        steps: the output of :func:`~moe_lightning.report.steps.step_values` (all steps).
        threshold: the absolute threshold of C3.
        level: coverage of the intervals.

    Returns:
        Columns ``family, layer, claim, comparison, metric, step, n seeds, mean_difference, ci_low, ci_high,
        bootstrap_low, bootstrap_high, effect_size, verdict, undersampled, paired``; one row per claim, family, layer
        and step at which its arms were both probed (seeds are paired within a step).
    """
    columns = [
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
    if steps.empty:
        return pd.DataFrame(columns=columns)
    steps = _with_arms(steps[steps["metric"].isin({c.metric for c in paper_claims()})])
    sides = _sides(steps, ["family", "layer", "step"])
    groups = dict.fromkeys(zip(steps["family"], steps["layer"], strict=True))
    all_steps = sorted({int(s) for s in steps["step"]})
    rows = []
    for family, layer in groups:
        for claim in paper_claims():
            comparison = f"{claim.a} {claim.metric} < {threshold:g}" if claim.b is None else claim.comparison
            for step in all_steps:
                side_a = sides.get((family, layer, step, claim.a, claim.metric))
                side_b = None if claim.b is None else sides.get((family, layer, step, claim.b, claim.metric))
                if side_a is None or (claim.b is not None and side_b is None):
                    continue
                decision = _decide_claim(claim, side_a, side_b, threshold, level)
                if claim.b is not None and not decision.seeds:
                    continue
                boot = decision.bootstrap
                under = any(s in side_a.undersampled or (side_b and s in side_b.undersampled) for s in decision.seeds)
                rows.append(
                    {
                        "family": family,
                        "layer": layer,
                        "claim": claim.claim,
                        "comparison": comparison,
                        "metric": claim.metric,
                        "step": step,
                        "n seeds": len(decision.seeds),
                        "mean_difference": decision.mean_difference,
                        "ci_low": decision.interval.low,
                        "ci_high": decision.interval.high,
                        "bootstrap_low": math.nan if boot is None else boot.low,
                        "bootstrap_high": math.nan if boot is None else boot.high,
                        "effect_size": decision.effect_size,
                        "verdict": decision.verdict,
                        "undersampled": bool(under),
                        "paired": claim.b is not None,
                    }
                )
    return pd.DataFrame(rows, columns=columns)


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
