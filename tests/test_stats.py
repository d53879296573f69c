"""The evaluation policy's numbers (lmref.core.stats) against reference values."""

import pytest

from lmref.core.stats import Score, Spread, compare

pytestmark = pytest.mark.unit


def test_wilson_interval_matches_the_textbook_values():
    # Wilson 95% for 50/100 is 40.4-59.6% (Newcombe 1998, table I gives the method); the normal
    # approximation would give 40.2-59.8%.
    low, high = Score(50, 100).interval
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    # At 0/10 the interval is not empty (the normal approximation collapses to 0-0).
    low, high = Score(0, 10).interval
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-4)
    assert str(Score(282, 500)) == "56.4% [52.0-60.7%] (n=500)"
    with pytest.raises(ValueError, match="correct <= total"):
        Score(5, 4)


def test_compare_calls_overlapping_intervals_within_noise():
    assert compare(Score(282, 500), Score(293, 500)) == "within noise"  # 56.4% vs 58.6%
    assert compare(Score(282, 500), Score(400, 500), ("base", "tuned")) == "tuned > base"
    assert compare(Spread.of([1.0, 1.1, 1.2]), Spread.of([2.0, 2.1, 2.2])) == "b > a"
    assert compare(Spread.of([1.0, 1.1, 1.2]), Spread.of([1.15, 2.1, 2.2])) == "within noise"
    # Two repeats are not enough to call a difference, however far apart.
    assert compare(Spread.of([1.0, 1.1]), Spread.of([9.0, 9.1])) == "within noise"
    with pytest.raises(TypeError):
        compare(Score(1, 2), Spread.of([1.0]))


def test_spread_is_median_and_range():
    s = Spread.of([14.1, 15.0, 12.9])
    assert (s.median, s.low, s.high, s.repeats) == (14.1, 12.9, 15.0, 3)
    assert str(s) == "14.1 (12.9-15, 3 repeats)"
