"""The decision rule on one claim: pair the seeds of two arms (or one arm and a threshold), and give the mean
paired difference with its t-interval over seeds, the bootstrap interval over probe tokens, the effect size and the
verdict the t-interval gives."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_lightning.analysis.intervals import (
    INCONCLUSIVE,
    RELATIONS,
    Interval,
    effect_size,
    percentile_interval,
    t_interval,
    verdict,
)

__all__ = ["DECISION_RULE", "LEVEL", "Decision", "decide", "decide_threshold"]

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
