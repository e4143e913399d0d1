"""The statistics behind the claims: Student's t quantile and the t-interval over seeds, the bootstrap percentile
interval over probe tokens, the standardised effect size, and the verdict an interval gives.

The t quantile is SciPy's (``torch.distributions.StudentT.icdf`` is not implemented).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
RELATIONS = ("<", ">")


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom (``scipy.stats.t.ppf``, with
    the arguments checked first).

    Args:
        p: probability in (0, 1).
        df: integer degrees of freedom, at least 1 (a t-interval over ``n`` seeds has ``n − 1``).

    Returns:
        ``t`` with ``P(T ≤ t) = p``.

    Example:
        >>> round(t_quantile(0.975, 2), 6)  # (2p − 1) / sqrt(2 p (1 − p)) for df = 2
        4.302653
    """
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    from scipy.stats import t as student_t  # scipy.stats takes a second to import; the claims need it

    return float(student_t.ppf(p, int(df)))


@dataclass(frozen=True)
class Interval:
    """A two-sided interval for a mean.

    Attributes:
        mean: the point estimate.
        low, high: the interval's ends (NaN when undefined).
        level: the coverage, e.g. 0.95.
        n: how many values (seeds, or bootstrap replicates) it rests on.
    """

    mean: float
    low: float
    high: float
    level: float
    n: int

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The t-interval of the mean: ``mean ± t_{(1+level)/2, n−1} · s / √n`` (``s``: sample std, ddof=1).

    Args:
        values: finite values, e.g. one paired difference per seed.
        level: coverage.

    Returns:
        The :class:`Interval`; its ends are NaN for fewer than 2 values.
    """
    _check_level(level)
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return Interval(mean, math.nan, math.nan, level, n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, level, n)


def percentile_interval(replicates: Sequence[float], level: float = 0.95) -> Interval:
    """The bootstrap percentile interval: the ``(1−level)/2`` and ``(1+level)/2`` quantiles of the replicates
    (numpy's default linear interpolation), over the finite ones.

    Args:
        replicates: one statistic per bootstrap replicate; NaN replicates (a statistic undefined on that resample)
            are left out.
        level: coverage.

    Returns:
        The :class:`Interval` (``mean``: the replicates' mean; ``n``: finite replicates); undefined for fewer than 2.
    """
    _check_level(level)
    x = np.asarray(replicates, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return Interval(float(x.mean()) if x.size else math.nan, math.nan, math.nan, level, int(x.size))
    low, high = np.quantile(x, [0.5 - level / 2.0, 0.5 + level / 2.0])
    return Interval(float(x.mean()), float(low), float(high), level, int(x.size))


def effect_size(differences: Sequence[float]) -> float:
    """Standardised effect size of paired differences: ``mean(d) / std(d)`` (sample std, ddof=1; Cohen's d_z).

    NaN for fewer than 2 values or when mean and std are both 0; ``±inf`` when every difference is the same non-zero
    number.
    """
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return math.nan
    mean, std = float(d.mean()), float(d.std(ddof=1))
    if std == 0.0:
        return math.nan if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / std


def verdict(interval: Interval, relation: str) -> str:
    """The verdict of an interval for the claim ``difference <relation> 0``: it holds when the interval excludes 0
    on the claimed side, does not hold when it excludes 0 on the other side, and is inconclusive otherwise (also
    when the interval is undefined)."""
    if relation not in RELATIONS:
        raise ValueError(f"relation={relation!r} is not supported; allowed values: '<', '>'")
    if not interval.defined:
        return INCONCLUSIVE
    below, above = interval.high < 0.0, interval.low > 0.0
    if below or above:
        return HOLDS if below == (relation == "<") else DOES_NOT_HOLD
    return INCONCLUSIVE


def bonferroni_level(level: float, tests: int) -> float:
    """The per-test coverage that keeps the family-wise error at ``1 − level`` over ``tests`` tests:
    ``1 − (1 − level) / tests``."""
    _check_level(level)
    if tests < 1:
        return level
    return 1.0 - (1.0 - level) / tests
