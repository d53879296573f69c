"""Dynamic configuration without a restart and a canary with auto-rollback, on real servers: two
``python -m lmref.serve`` replicas of the tiny model sharing a Redis configuration store
(lmref.serving.live, lmref.serving.routes_live, lmref.production.live_config,
lmref.production.canary), called round-robin by client threads while versions are loaded,
aliases shifted and versions unloaded through one replica's admin API."""

from __future__ import annotations

import concurrent.futures
import itertools
import shutil
import threading
import time

import pytest
import requests

pytest.importorskip("redis")

from lmref.lab.servers import start_redis, start_replica  # noqa: E402
from lmref.lab.services import Services  # noqa: E402

pytestmark = pytest.mark.integration  # Redis and two server replicas
KEY = "sk-live"
AUTH = {"Authorization": f"Bearer {KEY}"}
needs_redis = pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server (Debian)")


@pytest.fixture(scope="module")
def replicas(tiny_model_dir):
    with Services() as services:
        store = services.add(start_redis())
        args = ["--api-key", KEY, "--alias", "prod=v1:1", "--config-store-url", store.url]
        args += ["--torch-threads", "1", "--access-log", "off"]
        pair = [services.add(start_replica(f"v1={tiny_model_dir}", args)) for _ in range(2)]
        yield pair


def admin(method: str, url: str, path: str, body: dict | None = None) -> requests.Response:
    return requests.request(method, url + path, json=body, headers=AUTH, timeout=10)


def config(url: str) -> dict:
    return admin("GET", url, "/v1/admin/config").json()


def wait_applied(replicas, timeout: float = 30.0) -> float:
    """Seconds until every replica applied the store's latest version."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        seen = [config(r.url) for r in replicas]
        if all(c["applied_version"] == c["version"] for c in seen):
            assert len({c["version"] for c in seen}) == 1
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not applied in {timeout}s: {seen}")


class Load:
    """Client threads sending short completions to ``model`` round-robin over the replicas."""

    def __init__(self, replicas, model: str = "prod", clients: int = 4, limit: int = 200):
        self.urls = itertools.cycle([r.url for r in replicas])
        self.model, self.limit, self.results = model, limit, []
        self.stopped = threading.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client) for _ in range(clients)]

    def _client(self) -> None:
        session = requests.Session()
        while not self.stopped.is_set() and len(self.results) < self.limit:
            sent = time.monotonic()
            body = {"model": self.model, "prompt": "def f(", "max_tokens": 4, "temperature": 1.0}
            r = session.post(
                next(self.urls) + "/v1/completions", json=body, headers=AUTH, timeout=30
            )
            self.results.append((sent, r.status_code, r.json().get("model")))

    def stop(self) -> list:
        self.stopped.set()
        for f in self.futures:
            f.result(timeout=60)
        self.pool.shutdown()
        return self.results


@needs_redis
def test_load_shift_and_unload_under_load(replicas, tiny_model_dir):
    a, b = replicas
    r = admin("POST", a.url, "/v1/admin/models", {"name": "v2", "model": str(tiny_model_dir)})
    assert r.status_code == 202, r.text
    loaded_in = wait_applied(replicas)
    assert all(config(x.url)["serving"]["models"]["v2"] == "ready" for x in replicas)
    # Time, not the count, ends the load (the sleeps below); the limit only bounds it: a fast
    # server once sent 400 requests before the last change, leaving none to check after it.
    load = Load(replicas, limit=5000)
    time.sleep(0.5)
    assert admin("PUT", a.url, "/v1/admin/aliases/prod", {"weights": {"v1": 1, "v2": 1}}).ok
    half_in = wait_applied(replicas)
    time.sleep(1.0)
    changed = time.monotonic()
    assert admin("PUT", b.url, "/v1/admin/aliases/prod", {"weights": {"v2": 1}}).ok  # via b
    all_in = wait_applied(replicas)
    time.sleep(1.0)
    results = load.stop()
    failures = [s for _, s, _ in results if s != 200]
    after = [m for sent, _, m in results if sent > changed + all_in]
    print(
        f"\n{len(results)} requests, {len(failures)} failed; applied on both in: load "
        f"{loaded_in:.2f}s, 50/50 {half_in:.2f}s, 0/100 {all_in:.2f}s"
    )
    assert not failures
    assert {m for _, _, m in results} == {"v1", "v2"}
    assert after and set(after) == {"v2"}
    for replica in replicas:  # per version, not per alias
        text = requests.get(replica.url + "/metrics", timeout=5).text
        assert 'lmref:request_success_total{finished_reason="length",model_name="v2"}' in text
        assert 'model_name="prod"' not in text

    # unloading a version an alias routes to is refused; an unused one is released everywhere
    r = admin("DELETE", a.url, "/v1/admin/models/v2")
    assert r.status_code == 409 and "prod" in r.json()["error"]["message"]
    assert admin("DELETE", a.url, "/v1/admin/models/v1").status_code == 409  # the default
    assert admin("PUT", a.url, "/v1/admin/aliases/prod", {"weights": {"v1": 1}}).ok
    assert admin("DELETE", a.url, "/v1/admin/models/v2").status_code == 202
    wait_applied(replicas)
    deadline = time.monotonic() + 30
    while any("v2" in config(x.url)["serving"]["models"] for x in replicas):
        assert time.monotonic() < deadline, [config(x.url) for x in replicas]
        time.sleep(0.1)
    gone = requests.post(
        b.url + "/v1/completions", json={"model": "v2", "prompt": "x"}, headers=AUTH, timeout=10
    )
    assert gone.status_code == 404


@needs_redis
def test_bad_changes_are_refused_with_a_reason(replicas, tiny_model_dir):
    a, _ = replicas
    version = config(a.url)["version"]
    cases = [
        ("POST", "/v1/admin/models", {"name": "v9"}, 400, "model"),
        ("POST", "/v1/admin/models", {"name": "v9", "model": "/nonexistent/x"}, 400, "v9"),
        ("POST", "/v1/admin/models", {"name": "v1", "model": str(tiny_model_dir)}, 409, "v1"),
        (
            "POST",
            "/v1/admin/models",
            {"name": "v9", "model": str(tiny_model_dir), "x": 1},
            400,
            "x",
        ),
        ("PUT", "/v1/admin/aliases/prod", {"weights": {"v1": 0}}, 400, "> 0"),
        ("PUT", "/v1/admin/aliases/prod", {"weights": {"nope": 1}}, 404, "nope"),
        ("PUT", "/v1/admin/aliases/prod", {"weights": {}}, 400, "weights"),
        ("PUT", "/v1/admin/aliases/v1", {"weights": {"v1": 1}}, 409, "served model"),
        ("DELETE", "/v1/admin/models/nope", None, 404, "nope"),
    ]
    for method, path, body, status, says in cases:
        r = admin(method, a.url, path, body)
        assert r.status_code == status, (path, body, r.text)
        assert says in r.json()["error"]["message"], r.text
    assert config(a.url)["version"] == version  # nothing refused was written
    r = requests.get(a.url + "/v1/admin/config", timeout=5)
    assert r.status_code == 401


@needs_redis
@pytest.mark.skipif(not shutil.which("prometheus"), reason="prometheus (Debian)")
def test_canary_promotes_a_good_version_and_rolls_back_a_slow_one(replicas, tiny_model_dir):
    """Both ways the canary reads its numbers: the good version's from the replicas' /metrics,
    the slow one's from a real Prometheus scraping them; then the two readings are compared."""
    from lmref.lab.lifecycle_servers import start_prometheus
    from lmref.lab.prometheus_api import query
    from lmref.production.canary import CanaryConfig, quantile, query_prometheus, run_canary, scrape

    a, b = replicas
    urls = [a.url, b.url]
    assert admin(
        "POST", a.url, "/v1/admin/models", {"name": "good", "model": str(tiny_model_dir)}
    ).ok
    # The bad version on purpose: the same weights deployed with a 1 s batching window (an idle
    # worker gathers a burst for batch_wait_ms): honestly slower, not a faked failure.
    slow = {"name": "slow", "model": str(tiny_model_dir), "batch_wait_ms": 1000}
    assert admin("POST", a.url, "/v1/admin/models", slow).ok
    wait_applied(replicas)
    with Services() as services:
        prometheus = services.add(start_prometheus([f"127.0.0.1:{r.port}" for r in replicas]))
        load = Load(replicas, limit=10_000)
        try:
            common = dict(alias="prod", dwell_s=2.0, min_requests=5, max_latency_ratio=3.0)
            good = run_canary(
                CanaryConfig(champion="v1", candidate="good", steps=(25, 100), **common),
                a.url,
                urls,
                KEY,
            )
            bad = run_canary(
                CanaryConfig(champion="good", candidate="slow", steps=(10, 50, 100), **common),
                b.url,
                api_key=KEY,
                prometheus_url=prometheus.url,
            )
        finally:
            results = load.stop()
        print(f"\ncanary good: {good.decision}; slow: {bad.decision}: {bad.reason}")
        assert good.decision == "promoted", good
        assert bad.decision == "rolled_back", bad
        assert "champion" in bad.reason and len(bad.steps) == 1
        assert bad.steps[0].numbers["slow"]["requests"] >= 5  # judged on Prometheus's numbers
        assert all(s == 200 for _, s, _ in results)
        wait_applied(replicas)
        assert all(config(x.url)["serving"]["aliases"]["prod"] == {"good": 1.0} for x in replicas)

        # With the load stopped, Prometheus's sums (after its next scrape) equal the replicas' own,
        # and the canary's p99 equals PromQL's histogram_quantile over the same buckets.
        versions = ("v1", "good", "slow")
        deadline, direct = time.monotonic() + 15, scrape(urls)
        direct = {v: direct[v] for v in versions}
        while True:  # one reading of Prometheus a round, compared whole
            summed = query_prometheus(prometheus.url)
            if {v: summed.get(v) for v in versions} == direct:
                break
            assert time.monotonic() < deadline, (summed, direct)
            time.sleep(0.5)
        for version in versions:
            promql = (
                "histogram_quantile(0.99, sum by (le) "
                f'(lmref:e2e_request_latency_seconds_bucket{{model_name="{version}"}}))'
            )
            expected = float(query(prometheus.url, promql)[0]["value"][1])
            assert quantile(0.99, direct[version]["buckets"]) == pytest.approx(expected)
