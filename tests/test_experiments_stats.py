"""Seed statistics of the reproduction against scipy's own intervals and tabulated t values,
and the verdict rules case by case."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from nemo_opd.experiments.stats import (
    Estimate,
    difference,
    judge_at_least,
    judge_at_most,
    judge_difference,
    mean_interval,
)


def test_mean_interval_matches_tabulated_t_and_scipy():
    values = [0.948, 0.940, 0.956]
    est = mean_interval(values)
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}, from a t table
    assert est.mean == pytest.approx(mean, abs=1e-15)
    assert (est.low, est.high) == pytest.approx((mean - half, mean + half), abs=1e-12)
    low, high = scipy_stats.t.interval(0.95, 2, loc=mean, scale=scipy_stats.sem(values))
    assert (est.low, est.high) == pytest.approx((low, high), abs=1e-12)
    assert (est.n, est.minimum, est.maximum) == (3, 0.940, 0.956)
    assert est.text() == f"0.948 ± {half:.3f} (n=3)"


def test_one_value_has_no_interval():
    est = mean_interval([0.5])
    assert est.mean == 0.5 and math.isnan(est.low) and not est.has_interval
    assert est.text() == "0.500 (n=1)"
    assert math.isnan(difference([0.5], [0.4, 0.3]).low)


@pytest.mark.parametrize("a,b", [([0.95, 0.94, 0.96], [0.90, 0.93, 0.91]),
                                 ([0.5, 0.7, 0.6, 0.65], [0.62, 0.58, 0.61]),
                                 ([1.0, 2.0, 4.0], [1.5, 1.5, 1.6, 1.4, 1.5])])
def test_difference_is_welchs_interval(a, b):
    est = difference(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert est.mean == pytest.approx(sum(a) / len(a) - sum(b) / len(b), abs=1e-12)
    assert (est.low, est.high) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert est.n == min(len(a), len(b))


def test_equal_constant_sides_give_a_zero_width_interval():
    est = difference([0.9, 0.9], [0.8, 0.8])
    assert est.low == est.high == pytest.approx(0.1)


def _interval(low: float, high: float) -> Estimate:
    return Estimate((low + high) / 2, low, high, 3, math.nan, math.nan)


@pytest.mark.parametrize("low,high,claim,verdict", [
    (0.01, 0.05, "greater", "reproduced"),
    (-0.05, -0.01, "greater", "not reproduced"),     # the opposite holds
    (-0.005, 0.008, "greater", "not reproduced"),    # no difference beyond the margin
    (-0.02, 0.05, "greater", "inconclusive"),
    (-0.05, -0.01, "less", "reproduced"),
    (0.01, 0.05, "less", "not reproduced"),
    (-0.008, 0.009, "none", "reproduced"),
    (0.02, 0.06, "none", "not reproduced"),
    (0.002, 0.016, "none", "inconclusive"),          # excludes 0, mean inside the margin
    (-0.03, 0.04, "none", "inconclusive"),
])
def test_judge_difference(low, high, claim, verdict):
    assert judge_difference(_interval(low, high), claim, margin=0.01) == verdict


def test_judge_levels():
    assert judge_at_least(_interval(0.55, 0.7), 0.5) == "reproduced"
    assert judge_at_least(_interval(0.2, 0.45), 0.5) == "not reproduced"
    assert judge_at_least(_interval(0.4, 0.6), 0.5) == "inconclusive"
    assert judge_at_most(_interval(0.0, 0.04), 0.05) == "reproduced"
    assert judge_at_most(_interval(0.1, 0.3), 0.05) == "not reproduced"
    assert judge_at_most(_interval(0.02, 0.1), 0.05) == "inconclusive"
    single = mean_interval([0.9])
    assert judge_at_least(single, 0.5) == judge_difference(single, "none", 0.01) == "inconclusive"


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        difference([0.1, math.nan], [0.2])
    with pytest.raises(ValueError, match="claim must be one of"):
        judge_difference(_interval(0, 1), "bigger", 0.01)
    with pytest.raises(ValueError, match="margin must be > 0"):
        judge_difference(_interval(0, 1), "none", 0.0)
