"""The claims' statistics against scipy and hand-computed cases: the t quantile and t-interval over seeds, the
bootstrap percentile interval, the effect size, and the verdict rule on cases built to hold, to fail and to be
inconclusive (one seed, a NaN seed, an interval across 0, Bonferroni)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from moe_lightning.analysis import decide, decide_threshold, effect_size, percentile_interval, t_interval, t_quantile
from moe_lightning.analysis.intervals import Interval, bonferroni_level, verdict


def test_t_quantile_closed_forms():
    for p in (0.9, 0.975, 0.999, 0.3):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
        # df = 4: t = sign · 2 √(cos(φ/3) / √α − 1) with α = 4p(1 − p), φ = arccos(√α) (Hill 1970)
        alpha = 4 * p * (1 - p)
        q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
        assert t_quantile(p, 4) == pytest.approx(math.copysign(2 * math.sqrt(q - 1), p - 0.5), rel=1e-10)
        assert t_quantile(p, 10**7) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-6)  # the normal limit
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="df"):
            t_quantile(0.9, bad)
    with pytest.raises(ValueError, match="p must"):
        t_quantile(1.0, 3)


def test_t_interval_matches_scipy_and_a_hand_case():
    # Hand case: d = 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 0.95 / sqrt(2 · 0.975 · 0.025) = 4.30265...
    interval = t_interval([1.0, 2.0, 3.0])
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert (interval.mean, interval.n, interval.level) == (2.0, 3, 0.95)
    assert interval.low == pytest.approx(2 - half, rel=1e-12) and interval.high == pytest.approx(2 + half, rel=1e-12)
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        d = rng.normal(0.3, 1.0, n)
        for level in (0.95, 0.99):
            reference = stats.ttest_1samp(d, 0.0).confidence_interval(level)
            got = t_interval(d, level)
            np.testing.assert_allclose([got.low, got.high], [reference.low, reference.high], rtol=1e-9)


def test_t_interval_undefined_below_two_values():
    one, none = t_interval([0.7]), t_interval([])
    assert one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.high) and not one.defined
    assert math.isnan(none.mean) and none.n == 0
    with pytest.raises(ValueError, match="level"):
        t_interval([1.0, 2.0], level=1.5)


def test_percentile_interval_hand_case_and_nan_replicates():
    interval = percentile_interval(np.arange(101.0))  # quantile q of 0..100 is 100 q
    assert (interval.low, interval.high, interval.n) == pytest.approx((2.5, 97.5, 101))
    with_nan = percentile_interval([1.0, math.nan, 2.0, 3.0, 4.0, 5.0], level=0.5)  # 1..5: quartiles 2 and 4
    assert (with_nan.low, with_nan.high, with_nan.n) == (2.0, 4.0, 5)
    assert not percentile_interval([1.0, math.nan]).defined


def test_effect_size_is_t_over_sqrt_n():
    d = np.array([0.4, 1.1, 0.2, 0.9])
    assert effect_size(d) == pytest.approx(stats.ttest_1samp(d, 0.0).statistic / 2.0, rel=1e-12)
    assert effect_size([1.0, 2.0, 3.0]) == 2.0  # mean 2 / sd 1
    assert effect_size([0.5, 0.5]) == math.inf and math.isnan(effect_size([0.0, 0.0]))
    assert math.isnan(effect_size([1.0]))


def test_verdict_of_an_interval():
    assert verdict(Interval(-1.0, -2.0, -0.1, 0.95, 3), "<") == "holds"
    assert verdict(Interval(-1.0, -2.0, -0.1, 0.95, 3), ">") == "does not hold"
    assert verdict(Interval(1.0, 0.1, 2.0, 0.95, 3), ">") == "holds"
    assert verdict(Interval(0.5, -0.1, 1.0, 0.95, 3), ">") == "inconclusive"
    assert verdict(Interval(0.5, math.nan, math.nan, 0.95, 1), "<") == "inconclusive"
    with pytest.raises(ValueError, match="relation"):
        verdict(Interval(0.0, -1.0, 1.0, 0.95, 3), "<=")
    assert bonferroni_level(0.95, 10) == pytest.approx(0.995)


# ---------------------------------------------------------------------------------------------------------------
# The decision rule
# ---------------------------------------------------------------------------------------------------------------

A = {0: 1.0, 1: 1.2, 2: 0.8}
B = {0: 2.0, 1: 2.1, 2: 2.3}  # d = -1.0, -0.9, -1.5


def test_decide_built_to_hold_and_to_fail():
    d = np.array([-1.0, -0.9, -1.5])
    reference = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    holds = decide(A, B, "<")
    assert holds.verdict == "holds" and holds.seeds == (0, 1, 2) and holds.reason == ""
    assert reference.high < 0  # the case is built so that the interval lies below 0
    np.testing.assert_allclose([holds.interval.low, holds.interval.high], [reference.low, reference.high], rtol=1e-9)
    assert holds.mean_difference == pytest.approx(d.mean())
    assert holds.effect_size == pytest.approx(d.mean() / d.std(ddof=1))
    assert holds.std_a == pytest.approx(np.std(list(A.values()), ddof=1))
    assert holds.std_difference == pytest.approx(d.std(ddof=1))
    assert decide(A, B, ">").verdict == "does not hold"
    assert decide(B, A, ">").verdict == "holds"


def test_decide_inconclusive_cases():
    # Every d_s negative, but with 2 seeds t_{0.975,1} = 12.7: mean −0.45 ± 0.635 contains 0.
    small = decide({0: 1.0, 1: 3.0}, {0: 1.5, 1: 3.4}, "<")
    assert small.verdict == "inconclusive" and "interval contains 0" in small.reason
    assert small.interval.low < 0 < small.interval.high
    # Mixed signs.
    assert decide({0: 1.0, 1: 3.0, 2: 2.0}, {0: 2.0, 1: 2.0, 2: 2.0}, "<").verdict == "inconclusive"
    # One paired seed: interval undefined, no crash; unpaired seeds do not count.
    one = decide({0: 1.0, 1: 1.1}, {1: 5.0, 2: 5.0}, "<")
    assert one.verdict == "inconclusive" and one.seeds == (1,) and math.isnan(one.interval.low)
    assert one.mean_difference == pytest.approx(-3.9) and math.isnan(one.effect_size)
    assert "1 paired seed(s), need 2" in one.reason
    none = decide({0: 1.0}, {1: 2.0}, "<")
    assert none.verdict == "inconclusive" and none.seeds == () and math.isnan(none.mean_difference)
    with pytest.raises(ValueError, match="relation"):
        decide(A, B, "<=")


def test_decide_leaves_a_nan_seed_out_and_says_so():
    a = {**A, 3: math.nan}
    b = {**B, 3: 0.0}
    d = decide(a, b, "<")
    assert d.seeds == (0, 1, 2) and d.verdict == "holds" and "NaN in seed(s) 3, left out" in d.reason


def test_bonferroni_can_turn_a_verdict_inconclusive():
    # d = -1, -1.2, -0.8: 95% interval [-1.497, -0.503] excludes 0; the 99.9% one (t_{0.9995,2} = 31.6) does not.
    a, b = {0: 0.0, 1: 0.0, 2: 0.0}, {0: 1.0, 1: 1.2, 2: 0.8}
    assert decide(a, b, "<").verdict == "holds"
    assert decide(a, b, "<", level=bonferroni_level(0.95, 50)).verdict == "inconclusive"


def test_decide_threshold():
    values = {0: 0.02, 1: 0.05, 2: 0.03}
    d = decide_threshold(values, 0.1)
    reference = stats.ttest_1samp(np.array([0.02, 0.05, 0.03]) - 0.1, 0.0).confidence_interval(0.95)
    assert d.verdict == "holds" and d.mean_difference == pytest.approx(-0.0666666666)
    np.testing.assert_allclose([d.interval.low, d.interval.high], [reference.low, reference.high], rtol=1e-9)
    assert decide_threshold({0: 0.2, 1: 0.15, 2: 0.18}, 0.1).verdict == "does not hold"
    assert decide_threshold({0: 0.05, 1: 0.15}, 0.1).verdict == "inconclusive"
    assert decide_threshold({0: 0.05}, 0.1).verdict == "inconclusive"


def test_bootstrap_interval_hand_case():
    # Seed 0: d^(b) = 1..5; seed 1: d^(b) = 1 for all b. Mean over seeds: 1, 1.5, 2, 2.5, 3, whose 2.5% and 97.5%
    # quantiles (linear interpolation at positions 0.1 and 3.9) are 1.05 and 2.95.
    ra = {0: [1.0, 2.0, 3.0, 4.0, 5.0], 1: [2.0] * 5}
    rb = {0: [0.0] * 5, 1: [1.0] * 5}
    d = decide({0: 3.0, 1: 2.0}, {0: 0.0, 1: 1.0}, ">", replicates_a=ra, replicates_b=rb)
    assert (d.bootstrap.low, d.bootstrap.high, d.bootstrap.n) == pytest.approx((1.05, 2.95, 5))
    assert d.bootstrap_per_seed[0] == pytest.approx((0, 1.1, 4.9)) and d.bootstrap_per_seed[1] == (1, 1.0, 1.0)
    # A replicate left undefined (NaN) drops out and is counted; a side with more replicates is cut to the shorter.
    ra_nan = {0: [1.0, math.nan, 3.0, 4.0, 5.0, 9.0], 1: [2.0] * 5}
    d = decide({0: 3.0, 1: 2.0}, {0: 0.0, 1: 1.0}, ">", replicates_a=ra_nan, replicates_b=rb)
    assert d.bootstrap.n == 4 and "bootstrap: 4/5 replicates defined" in d.reason
    # A seed without replicates: no bootstrap interval, and the note names it.
    d = decide({0: 3.0, 1: 2.0}, {0: 0.0, 1: 1.0}, ">", replicates_a={0: ra[0]}, replicates_b=rb)
    assert d.bootstrap is None and "no replicates for seed(s) 1" in d.reason
    # Threshold claims: replicates minus the threshold.
    t = decide_threshold({0: 0.05, 1: 0.07}, 0.1, replicates={0: [0.04, 0.06], 1: [0.06, 0.08]})
    assert (t.bootstrap.low, t.bootstrap.high) == pytest.approx((-0.05 + 0.02 * 0.025, -0.03 - 0.02 * 0.025))


def test_claim_panels_draw_a_bootstrap_interval_that_excludes_the_mean(tmp_path, monkeypatch):
    """A percentile interval of the bootstrap need not contain the seed mean (a statistic biased under resampling,
    like an effective rank): the figure draws it from its own ends instead of failing on a negative error bar."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from matplotlib.collections import LineCollection

    from moe_lightning.report import plots

    frame = pd.DataFrame(
        {
            "step": [0, 100],
            "mean_difference": [1.0, 2.0],
            "ci_low": [0.5, 1.5],
            "ci_high": [1.5, 2.5],
            "bootstrap_low": [1.2, 2.3],  # both above the mean
            "bootstrap_high": [1.4, 2.6],
            "verdict": ["holds", "holds"],
            "undersampled": [False, True],
        }
    )
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path, title, **_: drawn.append(figure) or path)
    plots.plot_claim_panels([("claim", "A - B", {"layer": frame})], str(tmp_path / "claims.png"), "claims")
    (segments,) = [c.get_segments() for c in drawn[0].axes[0].collections if isinstance(c, LineCollection)]
    assert [tuple(s[:, 1]) for s in segments] == [(1.2, 1.4), (2.3, 2.6)]
