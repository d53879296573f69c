"""The difference of two models' accuracies on the same items, with its paired 95% interval:
what a release gate decides on (``lmref.evaluation.gate``).

Two models scored on the same items are paired: an item one gets right the other usually gets
right too, so the difference is far better known than two separate ``Score`` intervals suggest
(their overlap rule, ``lmref.core.stats.compare``, ignores the pairing and is too wide). Only
the items where they disagree move the difference.

The interval is Newcombe's hybrid score interval for paired proportions (Newcombe 1998,
Statistics in Medicine 17:2635, method 10): each model's Wilson interval (the course's
``Score``), combined through the phi correlation of the paired outcomes. Chosen over a bootstrap
over items because it is closed-form and deterministic (a gate's decision is reproduced from
its tags, with no seed), and it keeps good coverage at the small item counts and the 0% / 100%
accuracies a gate meets, where a bootstrap of a few discordant pairs collapses to a point and
the Wald interval leaves [-1, 1]. scipy has no paired-proportion interval, hence the few lines
here; the Wilson limits are scipy's (through ``Score``).

Usage::

    from lmref.evaluation.paired import PairedDifference

    d = PairedDifference.of(candidate_hits, champion_hits)   # lists of bools, same items
    d.difference, d.interval      # candidate minus champion: 0.2, (0.0528, 0.3339)
    d.interval[0] > -0.05         # non-inferior at a 5-point margin
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lmref.core.stats import Score


@dataclass(frozen=True)
class PairedDifference:
    """Counts of the 2x2 table of paired outcomes: ``both`` right, ``only_a`` (a right, b wrong),
    ``only_b``, ``neither``; the difference is a's accuracy minus b's."""

    both: int
    only_a: int
    only_b: int
    neither: int

    @classmethod
    def of(cls, a_hits: Sequence[bool], b_hits: Sequence[bool]) -> PairedDifference:
        """From per-item outcomes of a and b on the same items, in the same order."""
        if len(a_hits) != len(b_hits) or not a_hits:
            raise ValueError(
                f"paired outcomes need the same non-zero number of items: "
                f"{len(a_hits)} and {len(b_hits)}"
            )
        pairs = list(zip(map(bool, a_hits), map(bool, b_hits)))
        return cls(
            pairs.count((True, True)),
            pairs.count((True, False)),
            pairs.count((False, True)),
            pairs.count((False, False)),
        )

    @property
    def total(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def a(self) -> Score:
        return Score(self.both + self.only_a, self.total)

    @property
    def b(self) -> Score:
        return Score(self.both + self.only_b, self.total)

    @property
    def difference(self) -> float:
        return (self.only_a - self.only_b) / self.total

    @property
    def phi(self) -> float:
        """The correlation of the paired outcomes, as Newcombe's interval uses it: a positive
        ``ad - bc`` shrunk by n/2 toward 0 (Newcombe 1998; the worked example of Altman et al.,
        Statistics with Confidence, 2000, p. 52), so a few agreeing items never narrow the
        interval much; 0 where undefined (an empty margin, e.g. one model right on every item)."""
        a, b, c, d = self.both, self.only_a, self.only_b, self.neither
        denominator = (a + b) * (c + d) * (a + c) * (b + d)
        if not denominator:
            return 0.0
        cross = a * d - b * c
        cross = max(0.0, cross - self.total / 2) if cross > 0 else cross
        return cross / math.sqrt(denominator)

    @property
    def interval(self) -> tuple[float, float]:
        """Newcombe's method 10: the 95% interval of a's accuracy minus b's."""
        p1, p2 = self.a.value, self.b.value
        (l1, u1), (l2, u2), phi = self.a.interval, self.b.interval, self.phi
        low = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
        high = math.sqrt(
            max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
        )
        diff = p1 - p2
        return max(-1.0, diff - low), min(1.0, diff + high)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.difference:+.1%} [{low:+.1%} to {high:+.1%}] (n={self.total} paired)"
