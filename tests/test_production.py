"""The production architecture against real servers on 127.0.0.1: RabbitMQ and Redis (Debian's
packages), Celery workers in their own processes, server replicas behind nginx.

Covers the OpenAI Batch API on Celery (lmref.production.batch_api, .worker, .store: a worker
killed mid-job, poisoned jobs, time limits, queue depth), lmref.production.shared_cache (a cache
shared by replicas) and the deploy/ manifests (validated offline with kubernetes-validate)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

pytest.importorskip("celery")
pytest.importorskip("redis")
openai = pytest.importorskip("openai")

from lmref.lab.servers import (  # noqa: E402
    start_celery_worker,
    start_nginx,
    start_rabbitmq,
    start_redis,
    start_replica,
)
from lmref.lab.services import Services, remaining  # noqa: E402

pytestmark = pytest.mark.integration  # Redis, RabbitMQ, nginx, Celery workers
ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test"
needs_servers = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("redis-server", "nginx"))
    or not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists(),
    reason="redis-server, rabbitmq-server and nginx come from Debian (make system)",
)


@pytest.fixture(scope="module")
def backends():
    with Services() as services:
        yield services.add(start_redis()), services.add(start_rabbitmq())


def worker_env(backends, model_dir, **extra) -> dict:
    redis_, rabbit = backends
    return {
        "LMREF_BROKER_URL": rabbit.url,
        "LMREF_STORE_URL": redis_.url,
        "LMREF_WORKER_MODELS": f"tiny={model_dir}",
        **extra,
    }


def start_workers(services, backends, model_dir, names: list[str], **extra) -> dict:
    """Workers started together (each loads its model meanwhile), ready once all have."""
    from lmref.production.worker import READY_LINE

    workers = {
        name: services.add(
            start_celery_worker(
                "lmref.production.celery_worker",
                name,
                worker_env(backends, model_dir, **extra),
                wait=False,
            )
        )
        for name in names
    }
    for worker in workers.values():
        worker.wait_for_text(READY_LINE, timeout=120)
    return workers


@pytest.fixture(scope="module")
def api(backends, tiny_model_dir):
    """A server replica (in this process) with the Batch API and the shared cache, wired as
    ``python -m lmref.serve --cache-url ... --broker-url ... --store-url ...`` wires them."""
    from lmref.serve import SharedServices, start_server
    from lmref.serving.app import ModelSpec, ServingConfig

    redis_, rabbit = backends
    handle = start_server(
        ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[KEY]),
        shared=SharedServices(
            cache_url=redis_.url.replace("/0", "/2"), broker_url=rabbit.url, store_url=redis_.url
        ),
    )
    client = openai.OpenAI(base_url=handle.url + "/v1", api_key=KEY, max_retries=0)
    yield handle, client
    handle.stop(drain_timeout=5)


def request_line(custom_id: str, url: str = "/v1/chat/completions", **body) -> dict:
    """One Batch API input line; its text is its custom_id (a chat message or a prompt)."""
    text = {"prompt": custom_id} if url == "/v1/completions" else {
        "messages": [{"role": "user", "content": custom_id}]
    }  # fmt: skip
    body = {"model": "tiny", **text, "temperature": 0, "max_tokens": 4, **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def submit(client, lines: list[dict], tmp_path, **kw):
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    kw.setdefault("endpoint", "/v1/chat/completions")
    return client.batches.create(input_file_id=uploaded.id, completion_window="24h", **kw)


def wait_done(client, batch_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status == "completed":
            return batch
        assert time.monotonic() < deadline, f"batch not done: {batch}"
        time.sleep(0.2)


def jsonl(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def queue_depth(url: str) -> float | None:
    text = requests.get(url + "/metrics", timeout=10).text
    found = re.search(r'^lmref:batch_queue_depth\{queue="lmref-batch"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


@needs_servers
def test_worker_killed_mid_job_loses_nothing(backends, api, tiny_model_dir, tmp_path):
    handle, client = api
    from lmref.production.store import Store

    # Submitted before any worker runs: the queue depth the autoscaler reads shows all of them.
    lines = [request_line(f"job-{i}", max_tokens=220, ignore_eos=True, n=16) for i in range(6)]
    batch = submit(client, lines, tmp_path)
    assert batch.status == "in_progress" and batch.request_counts.total == 6
    assert queue_depth(handle.url) == 6
    store = Store(backends[0].url)
    with Services() as services:
        workers = start_workers(services, backends, tiny_model_dir, ["w1", "w2"])
        sessions = [w.pid for w in workers.values()]
        # Wait until a worker holds a job it has not finished, then kill it (SIGKILL, its whole
        # process group: the pool process with the model and the consumer).
        deadline = time.monotonic() + 60
        while True:
            running = store.running(batch.id)
            if running:
                break
            assert time.monotonic() < deadline, "no worker started a job"
            time.sleep(0.02)
        victim_job, victim = next(iter(running.items()))
        workers[victim.split("@")[0]].kill()
        assert not store.has_result(batch.id, victim_job)  # killed before it finished
        done = wait_done(client, batch.id)
    assert remaining(sessions) == []  # workers and their pool processes are gone
    output = jsonl(client, done.output_file_id)
    assert [x["custom_id"] for x in output] == [f"job-{i}" for i in range(6)]  # once, in order
    assert done.error_file_id is None and done.request_counts.completed == 6
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert all(len(x["response"]["body"]["choices"]) == 16 for x in output)
    attempts = store.attempts(batch.id)
    assert attempts[victim_job] == 2, attempts  # delivered again ...
    assert store.workers(batch.id)[victim_job] != victim  # ... and completed by the other
    assert queue_depth(handle.url) == 0


@needs_servers
def test_a_request_that_keeps_killing_workers_fails_as_a_poison_pill(
    backends, api, tiny_model_dir, tmp_path
):
    """With LMREF_MAX_ATTEMPTS=1 a request whose worker dies once is not run a second time: the
    next worker records it as failed (a request that crashes every worker it reaches would
    otherwise be redelivered forever), and the batch still completes."""
    handle, client = api
    from lmref.production.store import Store

    store = Store(backends[0].url)
    lines = [request_line("crashes-workers", max_tokens=220, ignore_eos=True, n=16)]
    with Services() as services:
        workers = start_workers(
            services, backends, tiny_model_dir, ["w5", "w6"], LMREF_MAX_ATTEMPTS="1"
        )
        batch = submit(client, lines, tmp_path)
        deadline = time.monotonic() + 60
        while not (running := store.running(batch.id)):
            assert time.monotonic() < deadline, "no worker started the request"
            time.sleep(0.02)
        workers[running["crashes-workers"].split("@")[0]].kill()
        done = wait_done(client, batch.id)
    errors = jsonl(client, done.error_file_id)
    assert done.output_file_id is None and done.request_counts.failed == 1
    assert errors[0]["error"]["code"] == "max_attempts_exceeded"
    assert "delivered 2 times, 1 without a result" in errors[0]["error"]["message"]
    assert store.attempts(batch.id)["crashes-workers"] == 2


@needs_servers
def test_poisoned_jobs_fail_alone(backends, api, tiny_model_dir, tmp_path):
    handle, client = api

    # The quick ones take ~15 ms. The slow one fills the worker's whole queue (16 prompts x
    # n=16 = 256 rows of 220 tokens, 16 batches one after the other: ~1.8 s on the fastest CPU
    # here, where one batch of 16 rows took 0.11 s and passed a 0.3 s limit): 0.3 s parts them.
    # A list of prompts is a completions request, so the whole batch is on /v1/completions.
    url = "/v1/completions"
    slow_prompts = [f"too slow {i}" for i in range(16)]
    lines = [
        request_line("ok-1", url, max_tokens=2),
        request_line("bad-max-tokens", url, max_tokens=-3),
        request_line("ok-2", url, max_tokens=2),
        request_line("unknown-model", url, model="nope"),
        request_line("too-slow", url, prompt=slow_prompts, max_tokens=220, ignore_eos=True, n=16),
        request_line("ok-3", url, max_tokens=2),
    ]
    with Services() as services:
        start_workers(services, backends, tiny_model_dir, ["w3"])
        # metadata job_time_limit_s: each request's Celery soft time limit (hard: +15 s)
        batch = submit(client, lines, tmp_path, endpoint=url, metadata={"job_time_limit_s": "0.3"})
        done = wait_done(client, batch.id)
    output, errors = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
    assert [x["custom_id"] for x in output] == ["ok-1", "ok-2", "ok-3"]
    assert done.request_counts.completed == 3 and done.request_counts.failed == 3
    by_id = {x["custom_id"]: x for x in errors}
    assert list(by_id) == ["bad-max-tokens", "unknown-model", "too-slow"]
    assert by_id["bad-max-tokens"]["response"]["status_code"] == 400
    assert by_id["bad-max-tokens"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert by_id["unknown-model"]["error"]["code"] == "model_not_found"
    assert by_id["too-slow"]["response"]["status_code"] == 504, by_id["too-slow"]
    assert by_id["too-slow"]["error"]["code"] == "time_limit_exceeded"
    assert "0.3 s" in by_id["too-slow"]["error"]["message"]


@needs_servers
def test_worker_forwards_to_an_upstream_openai_server(backends, api, tiny_model_dir, tmp_path):
    """LMREF_WORKER_UPSTREAM: the worker owns no model and forwards each request to another
    OpenAI-compatible server (here a replica of ours, standing in for vLLM or TGI)."""
    handle, client = api
    lines = [request_line("up-1"), request_line("up-bad", temperature=-1)]
    with Services() as services:
        start_workers(
            services,
            backends,
            tiny_model_dir,
            ["w4"],
            LMREF_WORKER_MODELS="",
            LMREF_WORKER_UPSTREAM=handle.url,
            LMREF_WORKER_UPSTREAM_KEY=KEY,
        )
        done = wait_done(client, submit(client, lines, tmp_path).id)
    output, errors = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
    assert [x["custom_id"] for x in output] == ["up-1"]
    assert output[0]["response"]["body"]["model"] == "tiny"
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
    assert done.id in [b.id for b in client.batches.list(limit=100)]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


@needs_servers
def test_batch_api_rejects_bad_input_naming_it(api, tmp_path):
    _, client = api
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(request_line("a")) + "\n" + json.dumps({"custom_id": "b"}) + "\n")
    uploaded = client.files.create(file=bad.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 2: 'url'"):
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError, match="batch_nope"):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError, match="file-nope"):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).batches.retrieve(
            "batch_x"
        )


@needs_servers
def test_cache_shared_by_replicas_behind_nginx(backends, tiny_model_dir):
    redis_url = backends[0].url
    with Services() as services:
        replicas = [
            services.add(
                start_replica(
                    f"tiny={tiny_model_dir}",
                    ["--cache-url", redis_url, "--cache-ttl-s", "600", "--torch-threads", "1"],
                    env={"LMREF_API_KEYS": ""},
                )
            )
            for _ in range(2)
        ]
        lb = services.add(start_nginx([f"127.0.0.1:{r.port}" for r in replicas]))
        body = {"model": "tiny", "prompt": "def shared(", "max_tokens": 12, "temperature": 0}
        answers = []
        for _ in range(4):  # round robin: the replicas alternate
            response = requests.post(lb.url + "/v1/completions", json=body, timeout=30)
            assert response.status_code == 200
            answers.append((response.headers["X-Upstream"], response.json()["choices"][0]["text"]))
        assert len({a[0] for a in answers}) == 2 and len({a[1] for a in answers}) == 1
        hits = [_metric(r.url, "lmref:response_cache_hits_total") for r in replicas]
        misses = [_metric(r.url, "lmref:response_cache_misses_total") for r in replicas]
        # One replica generated it once (one miss in all); every other answer was a hit, on
        # both replicas, including the one that never generated it.
        assert sum(misses) == 1 and sum(hits) == 3 and min(hits) >= 1
        keys = _redis(redis_url).keys("lmref:response:*")
        assert len(keys) == 1 and 0 < _redis(redis_url).ttl(keys[0]) <= 600
        # Logprobs survive the trip through Redis: the replica that did not generate the
        # answer returns the same tokens and numbers.
        scored = {**body, "prompt": "def scored(", "logprobs": 2, "echo": True}
        first, second = (
            requests.post(lb.url + "/v1/completions", json=scored, timeout=30) for _ in range(2)
        )
        assert first.headers["X-Upstream"] != second.headers["X-Upstream"]
        assert first.json()["choices"] == second.json()["choices"]
        assert len(first.json()["choices"][0]["logprobs"]["tokens"]) > 12

        # Kill one replica under load: nginx routes new requests to the survivor; only the
        # requests that were inside the killed replica fail (a POST is never retried mid-way).
        from lmref.lab.loadtest import closed_loop

        long_body = {"model": "tiny", "prompt": "x", "max_tokens": 64, "temperature": 1.0}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.perf_counter()
            load = pool.submit(closed_loop, lb.url, long_body, clients=4, seconds=4.5)
            time.sleep(1.5)
            killed_at = time.perf_counter() - started
            replicas[0].kill()
            results = load.result()
        failed = [r for r in results if r["status"] != 200]
        after = [r for r in results if r["start"] > killed_at + 0.5]
        assert len(results) > len(failed) and len(failed) <= 4  # at most the in-flight ones
        assert all(r["status"] in (502, 504) for r in failed), failed  # nginx: upstream went away
        assert after and all(r["status"] == 200 for r in after)
        assert {r["upstream"] for r in after} == {f"127.0.0.1:{replicas[1].port}"}


def _metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)


def test_shared_cache_misses_when_redis_is_down_and_keys_carry_the_version(
    tiny_model_dir, tmp_path
):
    from lmref.lab.services import free_port
    from lmref.production.shared_cache import RedisResponseCache
    from lmref.serving.engine import Finished

    down = RedisResponseCache(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    row = Finished(0, "text", "stop", 3, 1)
    down.put(("tiny", False, "'p'", 4, (), False), row)
    assert down.get(("tiny", False, "'p'", 4, (), False)) is None
    assert down.errors.labels(operation="get")._value.get() == 1
    assert down.errors.labels(operation="put")._value.get() == 1
    # Same version name, other weights: another key.
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    (other / "config.json").write_text((other / "config.json").read_text() + " ")
    a = RedisResponseCache("redis://127.0.0.1:1/0", versions={"tiny": str(tiny_model_dir)})
    b = RedisResponseCache("redis://127.0.0.1:1/0", versions={"tiny": str(other)})
    key = ("tiny", False, "'p'", 4, (), False)
    assert a.key(key) != b.key(key)
    assert a.key(key) == RedisResponseCache(
        "redis://127.0.0.1:1/0", versions={"tiny": str(tiny_model_dir)}
    ).key(key)


def k8s_resources() -> list[tuple[str, dict]]:
    import yaml

    return [
        (path.name, doc)
        for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_kubernetes_manifests_validate_offline():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    resources = k8s_resources()
    for _name, doc in resources:  # strict: an unknown or misspelled field fails too
        kubernetes_validate.validate(doc, "1.30", strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]): d for _, d in resources}
    server = kinds[("Deployment", "lmref-server")]["spec"]["template"]["spec"]["containers"][0]
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["resources"]["requests"]["cpu"] and server["resources"]["limits"]["memory"]
    assert ("Service", "lmref-server") in kinds and ("Deployment", "lmref-worker") in kinds
    # The worker autoscaler reads the queue depth, through the adapter rule that maps the
    # server's metric to it.
    hpa = kinds[("HorizontalPodAutoscaler", "lmref-worker")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "lmref-worker"
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "lmref_batch_queue_depth"
    adapter = kinds[("ConfigMap", "prometheus-adapter-lmref")]["data"]["config.yaml"]
    assert "name: {as: lmref_batch_queue_depth}" in adapter
    assert "lmref:batch_queue_depth" in adapter
    # The server's arguments are flags lmref.serve accepts.
    from lmref.serve import build_parser

    build_parser().parse_args(server["args"])
    # A broken manifest does fail: the check is live.
    broken = json.loads(json.dumps(kinds[("Deployment", "lmref-server")]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


@needs_servers
def test_grafana_dashboard_uses_metrics_the_server_exports(api):
    handle, _ = api
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "lmref-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]

    def base(name: str) -> str:
        return re.sub(r"_(total|bucket|sum|count)$", "", name)

    names = {base(n) for e in exprs for n in re.findall(r"lmref:[a-z0-9_]+", e)}
    exported = {
        base(n)
        for n in re.findall(
            r"^# TYPE (\S+) ", requests.get(handle.url + "/metrics", timeout=10).text, re.M
        )
    }
    assert len(names) >= 8 and names <= exported, names - exported
    adapter = next(
        d
        for n, d in k8s_resources()
        if d["kind"] == "ConfigMap" and "adapter" in d["metadata"]["name"]
    )["data"]["config.yaml"]
    assert set(re.findall(r"lmref:[a-z0-9_]+", adapter)) <= exported
