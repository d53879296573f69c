"""The paired difference of two models' accuracies (lmref.evaluation.paired): Newcombe's interval
against a hand computation, and its edges."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.unit


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_paired_difference_against_a_hand_computation():
    """Candidate right on 9 of 20 items where both are right on 8, only the candidate on 1,
    only the champion on 3: difference (1 - 3) / 20 = -0.10, computed here step by step."""
    from lmref.evaluation.paired import PairedDifference

    d = PairedDifference.of(
        [True] * 9 + [False] * 11, [True] * 8 + [False] + [True] * 3 + [False] * 8
    )
    assert (d.both, d.only_a, d.only_b, d.neither) == (8, 1, 3, 8)
    (l1, u1), (l2, u2) = _wilson(9, 20), _wilson(11, 20)  # 0.45 and 0.55
    assert d.a.interval == pytest.approx((l1, u1)) and d.b.interval == pytest.approx((l2, u2))
    phi = (8 * 8 - 1 * 3 - 20 / 2) / math.sqrt(9 * 11 * 11 * 9)  # (64 - 3 - 10) / 99 = 0.5152
    assert d.phi == pytest.approx(51 / 99)
    low = -0.10 - math.sqrt(
        (0.45 - l1) ** 2 - 2 * phi * (0.45 - l1) * (u2 - 0.55) + (u2 - 0.55) ** 2
    )
    high = -0.10 + math.sqrt(
        (u1 - 0.45) ** 2 - 2 * phi * (u1 - 0.45) * (0.55 - l2) + (0.55 - l2) ** 2
    )
    assert d.interval == pytest.approx((low, high))
    assert d.interval == pytest.approx((-0.2889, 0.1047), abs=1e-4)


def test_paired_difference_edges():
    from lmref.evaluation.paired import PairedDifference

    same = PairedDifference.of([True] * 40 + [False] * 20, [True] * 40 + [False] * 20)
    low, high = same.interval
    assert same.difference == 0 and low == pytest.approx(-high) and 0 < high < 0.05
    none_right = PairedDifference.of([False] * 20, [False] * 20)  # phi undefined: 0
    assert none_right.phi == 0 and none_right.interval[0] == pytest.approx(-_wilson(0, 20)[1])
    with pytest.raises(ValueError, match="same non-zero number of items"):
        PairedDifference.of([True], [True, False])
