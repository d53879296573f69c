"""The course's evaluation policy in numbers: a score with its 95% interval, speeds as a median
with the range of their repeats, and the one rule for calling a difference real.

A score measured on n examples is a binomial proportion: 56.4% on 500 examples is 52.0-60.7%
at 95%, so 56.4% vs 58.6% on the same 500 is *within noise*. Speeds on a shared 2-core machine
move tens of percent between repeats, so a speed is the median of repeats and its range, never
one run to three decimals. A conclusion rests on intervals that do not overlap, or on >= 3 seeds
whose ranges do not overlap; anything else is reported as within noise.

Usage::

    from lmref.core.stats import Score, Spread, compare

    a = Score(282, 500)                      # "56.4% [52.0-60.7%] (n=500)"
    b = Score(293, 500)
    compare(a, b)                            # "within noise"
    Spread.of([14.1, 15.0, 12.9])            # "14.1 (12.9-15.0, 3 repeats)"
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binomtest

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Score:
    """``correct`` of ``total`` examples right, with the Wilson 95% interval of the proportion.

    Wilson, not the normal approximation (p +- 1.96 sqrt(p(1-p)/n)): the latter leaves [0, 1]
    and collapses to a zero-width interval at 0% or 100%, which small evaluation sets hit.
    """

    correct: int
    total: int

    def __post_init__(self) -> None:
        if not 0 <= self.correct <= self.total or self.total <= 0:
            raise ValueError(
                f"a score needs 0 <= correct <= total and total > 0: {self.correct}/{self.total}"
            )

    @property
    def value(self) -> float:
        return self.correct / self.total

    @property
    def interval(self) -> tuple[float, float]:
        ci = binomtest(self.correct, self.total).proportion_ci(CONFIDENCE, method="wilson")
        return float(ci.low), float(ci.high)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.value:.1%} [{100 * low:.1f}-{high:.1%}] (n={self.total})"


@dataclass(frozen=True)
class Spread:
    """A measurement repeated: its median and the lowest and highest repeat."""

    median: float
    low: float
    high: float
    repeats: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def overlaps(self, other: Spread) -> bool:
        return self.low <= other.high and other.low <= self.high

    def __str__(self) -> str:
        return f"{self.median:.3g} ({self.low:.3g}-{self.high:.3g}, {self.repeats} repeats)"


def compare(a: Score | Spread, b: Score | Spread, names: tuple[str, str] = ("a", "b")) -> str:
    """``"a > b"``, ``"b > a"`` or ``"within noise"``: a difference is real when the 95% intervals
    (scores) or the ranges over repeats or seeds (spreads, >= 3 of each) do not overlap."""
    if isinstance(a, Score) and isinstance(b, Score):
        (a_low, a_high), (b_low, b_high) = a.interval, b.interval
        a_mid, b_mid = a.value, b.value
    elif isinstance(a, Spread) and isinstance(b, Spread):
        if min(a.repeats, b.repeats) < 3:
            return "within noise"  # fewer than 3 repeats: no range to rest a conclusion on
        a_low, a_high, b_low, b_high = a.low, a.high, b.low, b.high
        a_mid, b_mid = a.median, b.median
    else:
        raise TypeError(f"compare two Scores or two Spreads, not {type(a)} and {type(b)}")
    if a_low > b_high or b_low > a_high:
        return f"{names[0]} > {names[1]}" if a_mid > b_mid else f"{names[1]} > {names[0]}"
    return "within noise"
