"""The report's claims table: each evaluated claim (:func:`~moe_lightning.analysis.claims.evaluate_claims`) as a row
of text for people beside its raw numbers, the columns shown, and the multiple-comparison note."""

from __future__ import annotations

import math

import pandas as pd

from moe_lightning.analysis.claims import Evaluation, Side, bonferroni, evaluate_claims
from moe_lightning.analysis.decision import LEVEL
from moe_lightning.analysis.results import summarize
from moe_lightning.analysis.run import CONTROLS
from moe_lightning.report.format import format_interval, format_level, format_mean_std, format_number

__all__ = ["claims_display", "claims_table", "interval_labels", "multiple_comparison_note"]


def interval_labels(level: float) -> tuple[str, str]:
    """The column names of the t-interval over seeds and the bootstrap interval over tokens at ``level``.

    Example:
        >>> interval_labels(0.95)
        ('95% t-interval (seeds)', '95% bootstrap (tokens)')
    """
    percent = format_level(level)
    return f"{percent} t-interval (seeds)", f"{percent} bootstrap (tokens)"


def _undersampled_text(label: str, side: Side, seeds: tuple[int, ...]) -> str:
    hit = [s for s in seeds if s in side.undersampled]
    if not hit:
        return ""
    n_eff, width = min((side.undersampled[s] for s in hit), key=lambda p: p[0] / p[1] if p[1] > 0 else p[0])
    against = f" < {format_number(width)}" if math.isfinite(width) else ""
    return f"{label} {len(hit)}/{len(seeds)} seeds (min n_eff {format_number(n_eff)}{against})"


def _row(evaluation: Evaluation, threshold: float, level: float) -> dict:
    """One claims-table row: the text columns in the order people read them, then the raw numbers."""
    claim, decision, side_a, side_b = evaluation.claim, evaluation.decision, evaluation.side_a, evaluation.side_b
    used = decision.seeds
    if side_b is None:
        b_text = f"threshold {threshold:g}"
        ratio = [evaluation.align_ratio.get(s, math.nan) for s in used]
        note = f"ratio to chance: {format_mean_std(*summarize(ratio))}"
    else:
        b_text, note = format_mean_std(*summarize([side_b.values[s] for s in used])), ""
    marks = [_undersampled_text(claim.a, side_a, used)]
    if side_b is not None:
        marks.append(_undersampled_text(str(claim.b), side_b, used))
    under = "; ".join(t for t in marks if t)
    boot = decision.bootstrap
    t_label, boot_label = interval_labels(level)
    return {
        "family": evaluation.family,
        "layer": evaluation.layer,
        "claim": claim.claim,
        "statement": claim.statement,
        "metric": claim.metric,
        "comparison": evaluation.comparison,
        "control": claim.b if claim.b in CONTROLS else "",
        "A": format_mean_std(*summarize([side_a.values[s] for s in used])),
        "B": b_text,
        "mean difference": format_number(decision.mean_difference),
        t_label: format_interval(decision.interval.low, decision.interval.high),
        boot_label: "n/a" if boot is None else format_interval(boot.low, boot.high),
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
        "bootstrap_per_seed": " ".join(f"{s}:{format_interval(lo, hi)}" for s, lo, hi in decision.bootstrap_per_seed),
        "effect_size": decision.effect_size,
        "std_difference": decision.std_difference,
        "level": level,
        "undersampled": bool(under),
        "paired": side_b is not None,
        "seeds": " ".join(str(s) for s in used),
    }


def claims_table(values: pd.DataFrame, threshold: float = 0.1, level: float = LEVEL) -> pd.DataFrame:
    """Evaluate :data:`~moe_lightning.analysis.claims.PAPER_CLAIMS` on per-seed final values.

    A claim gets a row when its arms have runs in the table (a report without ``dense_active`` runs has no rows
    against that control). The Bonferroni columns use the t-interval at ``1 − (1 − level) / m``, ``m`` being the
    number of rows with at least 2 paired seeds.

    Args:
        values: the output of :func:`~moe_lightning.analysis.results.seed_values` (per layer rows when
            ``layer_mode="each"``).
        threshold: the absolute threshold of C3 on ``align_mean_offdiag``.
        level: coverage of the deciding t-interval.

    Returns:
        One row per claim, comparison, family and layer: the display columns (``A``, ``B`` as mean ± std, ``mean
        difference``, the intervals named by :func:`interval_labels`, ``effect size``, ``n seeds``, ``verdict``,
        ``verdict (Bonferroni)``, ``n_eff < D``, ``note``) and raw ones (``mean_difference``, ``ci_low``,
        ``ci_high``, ``bootstrap_low``, ``bootstrap_high``, ``bootstrap_replicates``, ``bootstrap_per_seed``,
        ``effect_size``, ``std_difference``, ``level``, ``bonferroni_level``, ``bonferroni_low``,
        ``bonferroni_high``, ``undersampled``, ``seeds``).
    """
    if values.empty:
        return pd.DataFrame()
    evaluations = evaluate_claims(values, threshold, level)
    table = pd.DataFrame([_row(e, threshold, level) for e in evaluations])
    if table.empty:
        return table
    tests, adjusted, strict, verdicts = bonferroni(evaluations, level)
    table.insert(table.columns.get_loc("verdict") + 1, "verdict (Bonferroni)", verdicts)
    table["bonferroni_level"] = adjusted
    table["bonferroni_low"] = [i.low for i in strict]
    table["bonferroni_high"] = [i.high for i in strict]
    table["tests"] = tests
    return table


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
    t_label, boot_label = interval_labels(float(table["level"].iloc[0]))
    columns = [
        "claim",
        "statement",
        "metric",
        "comparison",
        "A",
        "B",
        "mean difference",
        t_label,
        boot_label,
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
