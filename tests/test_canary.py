"""The canary's arithmetic (lmref.production.canary): the p99 from cumulative buckets as PromQL's
``histogram_quantile`` computes it, per-step deltas, and the judgment. The same numbers read
from real replicas and a real Prometheus: tests/test_live_config.py."""

from __future__ import annotations

import math

import pytest

from lmref.production.canary import CanaryConfig, delta, judge, quantile

pytestmark = pytest.mark.unit
BUCKETS = {0.1: 10.0, 0.5: 20.0, math.inf: 30.0}  # cumulative: 10 at <=0.1 s, 10 more <=0.5 s


def test_quantile_interpolates_within_a_bucket_and_stops_at_the_last_finite_bound():
    assert quantile(0.2, BUCKETS) == pytest.approx(0.1 * 6 / 10)  # the first bucket starts at 0
    assert quantile(0.5, BUCKETS) == pytest.approx(0.1 + 0.4 * 5 / 10)
    assert quantile(0.99, BUCKETS) == 0.5  # in +Inf: its lower bound, as Prometheus answers
    assert quantile(0.99, {}) is None and quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None


def test_delta_counts_only_the_step():
    before = {"v2": {"ok": 4.0, "errors": 0.0, "buckets": {0.1: 4.0, 0.5: 4.0, math.inf: 4.0}}}
    after = {"v2": {"ok": 13.0, "errors": 1.0, "buckets": {0.1: 4.0, 0.5: 13.0, math.inf: 14.0}}}
    step = delta(after, before, "v2")
    assert (step["requests"], step["errors"], step["error_rate"]) == (10, 1, 0.1)
    assert step["p99_s"] == 0.5  # the slowest of the step's 10 took more than 0.5 s
    assert delta(after, before, "absent") == {
        "requests": 0,
        "errors": 0,
        "error_rate": 0.0,
        "p99_s": None,
    }


def test_judge_names_every_bound_broken():
    config = CanaryConfig(
        "prod", "v1", "v2", max_error_rate=0.01, max_latency_ratio=2.0, max_p99_s=1
    )
    fine = {"v2": {"error_rate": 0.0, "p99_s": 0.3}}
    assert judge(config, fine, champion_p99=0.2) == []
    bad = {"v2": {"error_rate": 0.05, "p99_s": 1.5}}
    broken = judge(config, bad, champion_p99=0.5)
    assert len(broken) == 3 and "error rate" in broken[0] and "1.5" in broken[1]
    assert "3.0x the champion's" in broken[2]
    assert judge(config, {"v2": {"error_rate": 0.0, "p99_s": 0.9}}, champion_p99=None) == []
