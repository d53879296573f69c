"""A canary release with automatic rollback: shift an alias from the champion version to a
candidate step by step (10, 25, 50, 100 percent), watch the candidate's error rate and p99
latency at each step, go on while they stay within bounds, and put all traffic back on the
champion by itself when they do not.

Weights are set through a replica's admin API (``PUT /v1/admin/aliases/{alias}``); with a
shared configuration store (``lmref.production.live_config``) every replica applies them. The
numbers are read as deltas over each step, either from every replica's ``/metrics`` (summed)
or from a Prometheus server's query API (``prometheus_url``): per version
``lmref:request_success_total`` (finished sequences; aborts left out),
``lmref:request_errors_total`` and the ``lmref:e2e_request_latency_seconds`` histogram (p99 by
linear interpolation within a bucket, as PromQL's ``histogram_quantile`` does).

Usage::

    from lmref.production.canary import CanaryConfig, run_canary

    report = run_canary(CanaryConfig(alias="prod", champion="v1", candidate="v2",
                                     dwell_s=5, max_latency_ratio=3.0),
                        admin_url=replica_a.url, metrics_urls=[a.url, b.url], api_key="sk-x")
    report.decision          # "promoted" or "rolled_back"; report.steps: the numbers read
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("lmref.production.canary")


@dataclass
class CanaryConfig:
    """What to shift, how fast, and the bounds a candidate must stay within at every step."""

    alias: str
    champion: str
    candidate: str
    steps: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0)  # the candidate's percent of traffic
    dwell_s: float = 10.0  # how long each step lasts at least
    min_requests: int = 10  # ... and until the candidate finished this many in it
    max_dwell_s: float = 60.0  # a step without enough traffic after this is judged as it is
    max_error_rate: float = 0.01  # candidate errors / candidate requests in the step
    max_latency_ratio: float | None = 2.0  # candidate p99 / champion p99 (None: not checked)
    max_p99_s: float | None = None  # an absolute bound on the candidate's p99


@dataclass
class Step:
    percent: float
    seconds: float
    numbers: dict  # version -> {"requests", "errors", "error_rate", "p99_s"}
    violations: list[str] = field(default_factory=list)


@dataclass
class CanaryReport:
    decision: str  # "promoted" | "rolled_back"
    reason: str
    steps: list[Step]
    final_weights: dict[str, float]

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ reading numbers
def _get(url: str, api_key: str | None = None, timeout: float = 5.0) -> bytes:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return r.read()


def _blank() -> dict:
    return {"ok": 0.0, "errors": 0.0, "buckets": {}}


def scrape(urls: list[str]) -> dict[str, dict]:
    """Per version, summed over the replicas: finished requests, errors, latency buckets."""
    totals: dict[str, dict] = {}
    for url in urls:
        text = _get(url.rstrip("/") + "/metrics").decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                model = s.labels.get("model_name")
                if model is None:
                    continue
                t = totals.setdefault(model, _blank())
                if s.name == "lmref:request_success_total":
                    if s.labels.get("finished_reason") != "abort":  # the client left: not judged
                        t["ok"] += s.value
                elif s.name == "lmref:request_errors_total":
                    t["errors"] += s.value
                elif s.name == "lmref:e2e_request_latency_seconds_bucket":
                    le = float(s.labels["le"])
                    t["buckets"][le] = t["buckets"].get(le, 0.0) + s.value
    return totals


def query_prometheus(prometheus_url: str) -> dict[str, dict]:
    """The same totals from a Prometheus server scraping the replicas (its query API)."""
    queries = {
        "ok": 'sum by (model_name) (lmref:request_success_total{finished_reason!="abort"})',
        "errors": "sum by (model_name) (lmref:request_errors_total)",
        "buckets": "sum by (model_name, le) (lmref:e2e_request_latency_seconds_bucket)",
    }
    totals: dict[str, dict] = {}
    for what, query in queries.items():
        url = (
            prometheus_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
        )
        for item in json.loads(_get(url))["data"]["result"]:
            t = totals.setdefault(item["metric"]["model_name"], _blank())
            value = float(item["value"][1])
            if what == "buckets":
                t["buckets"][float(item["metric"]["le"])] = value
            else:
                t[what] = value
    return totals


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile``: cumulative bucket counts -> the q-quantile (None: no data)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower  # above the largest finite bucket: its bound, as Prometheus does
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower


def delta(after: dict, before: dict, version: str) -> dict:
    """One version's numbers between two readings."""
    a, b = after.get(version, _blank()), before.get(version, _blank())
    ok, errors = a["ok"] - b["ok"], a["errors"] - b["errors"]
    buckets = {le: n - b["buckets"].get(le, 0.0) for le, n in a["buckets"].items()}
    requests = ok + errors
    return {
        "requests": int(requests),
        "errors": int(errors),
        "error_rate": errors / requests if requests else 0.0,
        "p99_s": quantile(0.99, buckets),
    }


# ------------------------------------------------------------------------------------- the loop
def set_weights(admin_url: str, alias: str, weights: dict, api_key: str | None) -> None:
    request = urllib.request.Request(
        f"{admin_url.rstrip('/')}/v1/admin/aliases/{alias}",
        data=json.dumps({"weights": weights}).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {api_key}"} if api_key else {}),
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def judge(config: CanaryConfig, numbers: dict, champion_p99: float | None) -> list[str]:
    """The bounds the candidate broke in a step (empty: within them)."""
    cand, broken = numbers[config.candidate], []
    if cand["error_rate"] > config.max_error_rate:
        broken.append(f"error rate {cand['error_rate']:.3f} > {config.max_error_rate}")
    p99 = cand["p99_s"]
    if p99 is not None and config.max_p99_s is not None and p99 > config.max_p99_s:
        broken.append(f"p99 {p99:.3f}s > {config.max_p99_s}s")
    if p99 is not None and config.max_latency_ratio is not None and champion_p99:
        if p99 / champion_p99 > config.max_latency_ratio:
            broken.append(
                f"p99 {p99:.3f}s is {p99 / champion_p99:.1f}x the champion's "
                f"{champion_p99:.3f}s > {config.max_latency_ratio}x"
            )
    return broken


def run_canary(
    config: CanaryConfig,
    admin_url: str,
    metrics_urls: list[str] | None = None,
    api_key: str | None = None,
    prometheus_url: str | None = None,
) -> CanaryReport:
    """Step the candidate up while within bounds; roll back to the champion alone when not.
    Traffic to the alias comes from elsewhere (clients, a load generator) meanwhile."""
    if not metrics_urls and not prometheus_url:
        raise ValueError("give metrics_urls (replicas' /metrics) or a prometheus_url")

    def read() -> dict:
        return query_prometheus(prometheus_url) if prometheus_url else scrape(metrics_urls)

    steps: list[Step] = []
    champion_p99: float | None = None  # the latest the champion showed with traffic
    for percent in config.steps:
        if percent >= 100:
            weights = {config.candidate: 1.0}
        else:
            weights = {config.champion: 100.0 - percent, config.candidate: percent}
        set_weights(admin_url, config.alias, weights, api_key)
        before, start = read(), time.monotonic()
        while True:
            time.sleep(min(1.0, config.dwell_s))
            after, elapsed = read(), time.monotonic() - start
            done = delta(after, before, config.candidate)["requests"] >= config.min_requests
            if elapsed >= config.max_dwell_s or (elapsed >= config.dwell_s and done):
                break
        numbers = {v: delta(after, before, v) for v in (config.champion, config.candidate)}
        if numbers[config.champion]["p99_s"] is not None and numbers[config.champion]["requests"]:
            champion_p99 = numbers[config.champion]["p99_s"]
        step = Step(percent, round(elapsed, 2), numbers, judge(config, numbers, champion_p99))
        steps.append(step)
        log.info("canary %s at %s%%: %s %s", config.candidate, percent, numbers, step.violations)
        if step.violations:
            back = {config.champion: 1.0}
            set_weights(admin_url, config.alias, back, api_key)
            why = f"at {percent}%: " + "; ".join(step.violations)
            return CanaryReport("rolled_back", why, steps, back)
    return CanaryReport("promoted", "within bounds at every step", steps, {config.candidate: 1.0})
