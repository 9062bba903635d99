"""Seed statistics and the verdict rules of the seed reproduction (``docs/reproduction.md``).

Every comparison of the reproduction runs each configuration with several seeds and reports a
mean with a 95 % confidence interval (Student's t over the seeds), or, for a difference of two
configurations, Welch's interval (unequal variances, Welch–Satterthwaite degrees of freedom).
A claim is then judged by one of three rules, fixed before any run:

* :func:`judge_difference` — a claimed direction (``"greater"``/``"less"``) or a claimed absence of
  a difference (``"none"``), with a ``margin`` below which a difference counts as noise;
* :func:`judge_at_least` / :func:`judge_at_most` — a claimed level (e.g. "recovers at least half
  of the PTQ gap", "collapses to under 5 % accuracy").

Each returns one of :data:`VERDICTS`. With fewer than two seeds on a side there is no interval:
the verdict is "inconclusive" whatever the means say (the ``quick`` preset runs one seed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["CONFIDENCE", "VERDICTS", "Estimate", "difference", "judge_at_least",
           "judge_at_most", "judge_difference", "mean_interval"]

CONFIDENCE = 0.95
"""Two-sided confidence of every interval."""

VERDICTS = ("reproduced", "not reproduced", "inconclusive")

_DIRECTIONS = ("greater", "less", "none")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over seeds (or a difference of two means) with its confidence interval."""

    mean: float
    low: float
    """Lower end of the interval; NaN with fewer than two values (on a side)."""
    high: float
    n: int
    """Values behind it (for a difference: the smaller side's count)."""
    minimum: float
    maximum: float
    """Range of the values (of the per-seed differences' sides for a difference: NaN)."""

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def text(self, digits: int = 3) -> str:
        """``"0.948 ± 0.012 (n=3)"``, or ``"0.948 (n=1)"`` without an interval."""
        if not self.has_interval:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {(self.high - self.low) / 2:.{digits}f} (n={self.n})"


def _t_quantile(df: float, confidence: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def _check(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name} is empty: a comparison needs at least one value per side")
    if any(not math.isfinite(v) for v in out):
        raise ValueError(f"{name} holds a non-finite value: {out}")
    return out


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean of ``values`` with Student's t interval ``mean ± t_{n-1} · s / √n`` (``s`` the
    sample standard deviation, ``n − 1`` in its denominator); no interval for one value."""
    xs = _check(values, "values")
    n = len(xs)
    mean = math.fsum(xs) / n
    low = high = math.nan
    if n > 1:
        var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
        half = _t_quantile(n - 1, confidence) * math.sqrt(var / n)
        low, high = mean - half, mean + half
    return Estimate(mean, low, high, n, min(xs), max(xs))


def difference(a: Sequence[float], b: Sequence[float],
               confidence: float = CONFIDENCE) -> Estimate:
    """``mean(a) − mean(b)`` with Welch's interval: ``± t_ν · √(s_a²/n_a + s_b²/n_b)``,
    ``ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1))``. Equal values on
    both sides (zero variance) give a zero-width interval. No interval when a side has one
    value."""
    xs, ys = _check(a, "a"), _check(b, "b")
    mean = math.fsum(xs) / len(xs) - math.fsum(ys) / len(ys)
    n = min(len(xs), len(ys))
    low = high = math.nan
    if n > 1:
        terms = [math.fsum((v - math.fsum(side) / len(side)) ** 2 for v in side)
                 / (len(side) - 1) / len(side) for side in (xs, ys)]
        se2 = terms[0] + terms[1]
        if se2 == 0:
            low = high = mean
        else:
            df = se2 ** 2 / (terms[0] ** 2 / (len(xs) - 1) + terms[1] ** 2 / (len(ys) - 1))
            half = _t_quantile(df, confidence) * math.sqrt(se2)
            low, high = mean - half, mean + half
    return Estimate(mean, low, high, n, math.nan, math.nan)


def judge_difference(diff: Estimate, claim: str, margin: float) -> str:
    """Judge a claimed difference ``a − b`` (:func:`difference`).

    * ``claim="greater"`` (``"less"`` mirrored): reproduced when the interval lies above 0; not
      reproduced when it lies below 0 (the opposite holds) or inside ``(−margin, margin)`` (no
      difference bigger than noise); otherwise inconclusive.
    * ``claim="none"``: reproduced when the interval lies inside ``(−margin, margin)``; not
      reproduced when it excludes 0 and its mean is beyond ``margin``; otherwise inconclusive.
    """
    if claim not in _DIRECTIONS:
        raise ValueError(f"claim must be one of {_DIRECTIONS}, got {claim!r}")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    if not diff.has_interval:
        return "inconclusive"
    if claim == "less":
        diff = dataclasses.replace(diff, mean=-diff.mean, low=-diff.high, high=-diff.low)
        claim = "greater"
    within = -margin < diff.low and diff.high < margin
    if claim == "none":
        if within:
            return "reproduced"
        excludes_zero = diff.low > 0 or diff.high < 0
        return "not reproduced" if excludes_zero and abs(diff.mean) >= margin else "inconclusive"
    if diff.low > 0:
        return "reproduced"
    if diff.high < 0 or within:
        return "not reproduced"
    return "inconclusive"


def judge_at_least(estimate: Estimate, level: float) -> str:
    """Reproduced when the interval lies at or above ``level``, not reproduced when it lies
    below, inconclusive otherwise (or without an interval)."""
    if not estimate.has_interval:
        return "inconclusive"
    if estimate.low >= level:
        return "reproduced"
    return "not reproduced" if estimate.high < level else "inconclusive"


def judge_at_most(estimate: Estimate, level: float) -> str:
    """Mirror of :func:`judge_at_least`: the interval at or below ``level``."""
    mirrored = dataclasses.replace(estimate, mean=-estimate.mean, low=-estimate.high,
                                   high=-estimate.low)
    return judge_at_least(mirrored, -level)
