"""The course's evaluation policy in numbers: a score with its 95% interval, speeds as a median
with the range of their repeats, and the one rule for calling a difference real.

A score measured on n examples is a binomial proportion: 56.4% on 500 examples is 52.0-60.7%
at 95%, so 56.4% vs 58.6% on the same 500 is *within noise*. Speeds on a shared 2-core machine
move tens of percent between repeats, so a speed is the median of repeats and its range, never
one run to three decimals. A conclusion rests on intervals that do not overlap, or on >= 3 seeds
whose ranges do not overlap; anything else is reported as within noise.

Usage::

    from lmref.core.stats import Score, Spread, bootstrap_interval, compare, two_proportion_test

    a = Score(282, 500)                      # "56.4% [52.0-60.7%] (n=500)"
    b = Score(293, 500)
    compare(a, b)                            # "within noise"
    Spread.of([14.1, 15.0, 12.9])            # "14.1 (12.9-15.0, 3 repeats)"
    two_proportion_test(a, b)                # 0.52: no evidence the two rates differ
    bootstrap_interval([bits, nbytes], lambda b, n: b.sum(-1) / n.sum(-1))   # (low, high)
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, bootstrap, fisher_exact

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


def two_proportion_test(a: Score, b: Score) -> float:
    """Two-sided p-value that two independent scores (version A's and B's outcomes on their own
    requests or items) come from one success rate: Fisher's exact test on the 2x2 table.

    Fisher's, not the two-proportion z-test: the z-test leans on the normal approximation, which
    is poor for the small counts and near-0%/100% rates of an A/B slice or a canary, while
    Fisher's is exact at any size and scipy computes it in microseconds at these counts. A
    p-value under 0.05 says the rates differ; it does not say by how much (quote both Scores).
    """
    table = [[a.correct, a.total - a.correct], [b.correct, b.total - b.correct]]
    return float(fisher_exact(table, alternative="two-sided").pvalue)


def bootstrap_interval(
    data: Sequence[float] | Sequence[Sequence[float]],
    statistic: Callable[..., np.ndarray | float] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The ``confidence`` interval of ``statistic`` over resampled units (documents, prompts),
    by the percentile bootstrap of ``scipy.stats.bootstrap``, seeded so a rerun gives one answer.

    ``data`` is one sequence (``statistic`` defaults to the mean) or several of equal length that
    are resampled together (paired): the per-unit parts of a ratio such as bits and bytes per
    document, with ``statistic=lambda bits, nbytes: bits.sum(-1) / nbytes.sum(-1)`` (vectorised
    over the last axis). Percentile rather than BCa: BCa returns NaN for few or tied units,
    which a small evaluation set has. The units must be independent: resample documents, not
    the tokens inside them.
    """
    arrays = (
        [np.asarray(data, dtype=float)]
        if np.ndim(data[0]) == 0
        else [np.asarray(d, dtype=float) for d in data]
    )
    if len({len(a) for a in arrays}) != 1 or len(arrays[0]) < 2:
        raise ValueError(
            f"bootstrap needs sequences of one length >= 2, got lengths {[len(a) for a in arrays]}"
        )
    stat = statistic or (lambda x: np.mean(x, axis=-1))
    result = bootstrap(
        tuple(arrays),
        lambda *xs, axis=-1: stat(*xs),  # scipy passes units on the last axis (axis=-1)
        paired=len(arrays) > 1,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
