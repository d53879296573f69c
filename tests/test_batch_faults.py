"""The Batch pipeline under faults, against real Redis, RabbitMQ and Celery workers on 127.0.0.1:
the store frozen (SIGSTOP) and restarted mid-batch, the broker down at create, lost messages
found by the sweeper, a store under memory pressure, and the checks that run before any of them
(ids, metadata, timeouts, the deployment's manifests, the cache's weights fingerprint)."""

from __future__ import annotations

import collections
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("celery")
redis = pytest.importorskip("redis")
openai = pytest.importorskip("openai")

from lmref.lab.faults import frozen  # noqa: E402
from lmref.lab.servers import start_celery_worker, start_rabbitmq, start_redis  # noqa: E402
from lmref.lab.services import Services, free_port  # noqa: E402
from lmref.production.batch_input import check_metadata  # noqa: E402
from lmref.production.celery_app import BatchConfig  # noqa: E402
from lmref.production.store import Store, batch_id_ok, file_id_ok  # noqa: E402
from lmref.serving.schema import APIError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test"
needs_servers = pytest.mark.skipif(
    not shutil.which("redis-server") or not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists(),
    reason="redis-server and rabbitmq-server come from Debian (make system)",
)


# ----------------------------------------------------------------------- the deployment, read
def manifests() -> dict[tuple[str, str], dict]:
    return {
        (doc["kind"], doc["metadata"]["name"]): doc
        for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    }


def store_problems(resources: dict[tuple[str, str], dict]) -> list[str]:
    """What would let the deployed store lose batch state: an evicting policy, no volume under
    its data folder, no append-only file, or the cache sharing its Redis."""
    config = resources[("ConfigMap", "lmref-config")]["data"]
    store_host = config["LMREF_STORE_URL"].split("//")[1].split(":")[0]
    cache_host = config["LMREF_CACHE_URL"].split("//")[1].split(":")[0]
    problems = [] if store_host != cache_host else ["the cache and the store share one Redis"]
    kind = next((k for k in ("StatefulSet", "Deployment") if (k, store_host) in resources), None)
    if kind is None:
        return [*problems, f"no workload named {store_host}"]
    spec = resources[(kind, store_host)]["spec"]
    container = spec["template"]["spec"]["containers"][0]
    args = container.get("args", [])
    setting = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    if setting.get("--maxmemory-policy", "noeviction") != "noeviction":
        problems.append(f"the store evicts ({setting['--maxmemory-policy']})")
    if setting.get("--appendonly") != "yes":
        problems.append("the store keeps no append-only file")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    if mounts.get(setting.get("--dir", "/data")) not in claims:
        problems.append("the store's data folder is not on a persistent volume")
    return problems


def store_args() -> list[str]:
    """The deployed store's redis-server settings (its --dir is the test's own, and its password
    start_redis's: the manifest's is a Secret the kubelet fills in)."""
    resources = manifests()
    host = resources[("ConfigMap", "lmref-config")]["data"]["LMREF_STORE_URL"].split("//")[1]
    args = resources[("StatefulSet", host.split(":")[0])]["spec"]["template"]["spec"]["containers"][
        0
    ]["args"]
    for flag in ("--dir", "--requirepass"):
        i = args.index(flag)
        args = args[:i] + args[i + 2 :]
    return args


@pytest.mark.unit
def test_deployed_store_cannot_evict_or_forget():
    assert store_problems(manifests()) == []
    # The check is live: the manifest as it was (one Redis, volatile-lru, no volume) fails it.
    broken = manifests()
    broken[("ConfigMap", "lmref-config")]["data"]["LMREF_CACHE_URL"] = "redis://lmref-store:6379/1"
    container = broken[("StatefulSet", "lmref-store")]["spec"]["template"]["spec"]["containers"][0]
    container["args"][container["args"].index("noeviction")] = "volatile-lru"
    del container["volumeMounts"]
    assert len(store_problems(broken)) == 3, store_problems(broken)


# ------------------------------------------------------------------------ checks before Redis
@pytest.mark.unit
def test_ids_are_checked_against_their_format():
    assert batch_id_ok("batch_" + "a" * 32) and file_id_ok("file-" + "0" * 32)
    assert file_id_ok(f"file-batch_{'f' * 32}-output") and file_id_ok(
        f"file-batch_{'f' * 32}-errors"
    )
    for bad in ("batch_" + "a" * 32 + ":order", "file:x", "batch_*", "", "batch_" + "A" * 32):
        assert not batch_id_ok(bad) and not file_id_ok(bad)
    # A store that is unreachable is never called for a malformed id (it would time out).
    store = Store(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    assert store.batch("batch_x:order") is None and store.file("file:batch_x") is None


@pytest.mark.unit
def test_every_client_has_bounded_timeouts_and_no_hidden_retries():
    """redis-py 6 and later retry a failed command 3 times with backoff unless told otherwise;
    the store's and the cache's clients are told, so a frozen Redis costs one timeout."""
    from lmref.production.celery_app import make_celery
    from lmref.production.connections import redis_client
    from lmref.production.shared_cache import RedisResponseCache

    url = f"redis://127.0.0.1:{free_port()}/0"
    clients = [redis_client(url, 2.0), Store(url).r, RedisResponseCache(url, timeout_s=0.5).client]
    for client in clients:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] and kwargs["socket_connect_timeout"]
        assert kwargs["retry"].get_retries() == 0
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        Store(url).batch("batch_" + "0" * 32)  # nothing listens: refused, no retries
    assert time.monotonic() - started < 1.0
    producer = make_celery(BatchConfig(), producer=True).conf
    assert producer.broker_connection_timeout == 5.0
    assert producer.broker_transport_options["confirm_publish"] is True
    assert producer.task_publish_retry_policy["max_retries"] == 2


@pytest.mark.unit
def test_metadata_is_held_to_openais_limits_and_cannot_raise_the_time_limit():
    assert check_metadata({"team": "a", "job_time_limit_s": "30"}, 300.0) is not None
    cases = {
        "17 pairs": ({str(i): "v" for i in range(17)}, "at most 16"),
        "long key": ({"k" * 65: "v"}, "at most 64"),
        "long value": ({"k": "v" * 513}, "at most 512"),
        "number value": ({"k": 1}, "must be a string"),
        "raised limit": ({"job_time_limit_s": "86400"}, r"\(0, 300\]"),
        "nan limit": ({"job_time_limit_s": "nan"}, "must be seconds"),
        "not an object": (["k"], "must be an object"),
    }
    for name, (metadata, message) in cases.items():
        with pytest.raises(APIError, match=message) as err:
            check_metadata(metadata, 300.0)
        assert err.value.status == 400 and err.value.param == "metadata", name
    assert BatchConfig(job_time_limit_s=300).time_limit({"job_time_limit_s": "30"}) == 30
    assert BatchConfig(job_time_limit_s=300).time_limit({"job_time_limit_s": "9000"}) == 300


@pytest.mark.unit
def test_cache_fingerprint_sees_a_change_in_a_late_tensor(tmp_path):
    """Two model folders that differ only in one value of their last tensor (past the first MiB
    that a size-and-prefix fingerprint reads) never share a cache key."""
    import torch
    from safetensors.torch import save_file

    from lmref.production.shared_cache import RedisResponseCache, folder_fingerprint

    tensors = {"a.weight": torch.zeros(512, 1024), "z.weight": torch.zeros(64, 64)}  # 2 MiB, then
    folders = []
    for name, late_value in (("v1", 0.0), ("v2", 1e-3)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        save_file(
            {**tensors, "z.weight": torch.full((64, 64), late_value)}, folder / "model.safetensors"
        )
        folders.append(str(folder))
    v1, v2 = (Path(f) / "model.safetensors" for f in folders)
    assert v1.stat().st_size == v2.stat().st_size > 2 << 20
    with v1.open("rb") as a, v2.open("rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)  # same size, same first MiB
    assert folder_fingerprint(folders[0]) != folder_fingerprint(folders[1])
    url, key = f"redis://127.0.0.1:{free_port()}/0", ("tiny", False, "'p'", 4, (), False)
    a = RedisResponseCache(url, versions={"tiny": folders[0]})
    b = RedisResponseCache(url, versions={"tiny": folders[1]})
    assert a.key(key) != b.key(key)
    assert a.key(key) == RedisResponseCache(url, versions={"tiny": folders[0]}).key(key)


# ------------------------------------------------------------------ racing status changes
@needs_servers
@pytest.mark.integration
def test_a_final_status_is_never_overwritten_by_a_racing_cancel():
    """A cancel and the finalize of the last result, on two replicas at once: the batch ends
    completed or cancelled, never ``cancelling`` for ever with its output written (what a
    read-then-write update allowed). Then the late writers in turn: a batch that ended keeps
    its end."""
    import threading

    from lmref.production.batch_api import new_batch
    from lmref.production.store import result_line

    with Services() as services:
        store = Store(services.add(start_redis()).url)
        ends = collections.Counter()
        for _ in range(40):
            batch = new_batch("/v1/chat/completions", "file-" + "0" * 32, 1, None, "alice")
            batch.update(status="in_progress")
            store.put_batch(batch, ["a"])
            store.record(batch["id"], "a", result_line("a", 200, {}, "req_1"))
            racers = [
                threading.Thread(target=store.finalize, args=(batch["id"],)),
                threading.Thread(target=store.cancel, args=(batch["id"], "alice")),
            ]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join()
            store.finalize(batch["id"])  # what any later reader does
            ends[store.batch(batch["id"])["status"]] += 1
        assert set(ends) <= {"completed", "cancelled"}, ends
        assert store.live_batch_ids() == []
        done = store.batch(batch["id"])
        assert store.cancel(batch["id"], "alice")["status"] == done["status"]
        assert store.update_batch(batch["id"], status="in_progress")["status"] == done["status"]
        assert store.batch(batch["id"]) == done


# ------------------------------------------------------------- a store under memory pressure
@needs_servers
@pytest.mark.integration
def test_store_under_memory_pressure_keeps_every_live_batch(tmp_path):
    """The deployed store's settings, with 4 MB of memory: cache-like keys fill it; every batch
    key stays, and a write that does not fit fails (a 503 for the API, a wait for a worker).
    The same fill under the old policy (volatile-lru) loses batch keys: the check can fail."""
    from lmref.production.connections import STORE_ERRORS

    def fill(args: list[str]) -> tuple[int, int, bool]:
        with Services() as services:
            server = services.add(start_redis(args=[*args, "--maxmemory", "4mb"]))
            store = Store(server.url)
            for i in range(30):
                batch = {"id": f"batch_{i:032x}", "created_at": i, "status": "in_progress"}
                store.put_batch(batch, [f"r{j}" for j in range(20)])
            before = len(store.r.keys("lmref:batch:*"))
            refused = False
            for i in range(20_000):  # ~20 MB of cache entries with a TTL
                try:
                    store.r.set(f"lmref:response:{i}", b"x" * 1000, ex=3600)
                except STORE_ERRORS:
                    refused = True
                    break
            return before, len(store.r.keys("lmref:batch:*")), refused

    before, after, refused = fill(store_args())
    # each batch and its order; the index, the owner's index, the live set
    assert refused and after == before == 30 * 2 + 3
    before, after, refused = fill(["--maxmemory-policy", "volatile-lru"])
    assert not refused and after < before


# ------------------------------------------------------------------ real servers, faults mid-batch
@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    """RabbitMQ, a store Redis with the deployed settings (append-only, noeviction) in a folder
    that outlives a restart, two Celery workers and a replica (in this process) with the Batch
    API; its sweeper is driven by the tests (interval 0)."""
    from lmref.production.worker import READY_LINE
    from lmref.serve import SharedServices, build_app
    from lmref.serving.app import ModelSpec, ServingConfig
    from lmref.serving.server import start_in_thread

    store_dir = str(tmp_path_factory.mktemp("store"))
    with Services() as services:
        rabbit = services.add(start_rabbitmq())
        store_redis = services.add(start_redis(args=store_args(), workdir=store_dir))
        env = {
            "LMREF_BROKER_URL": rabbit.url,
            "LMREF_STORE_URL": store_redis.url,
            "LMREF_WORKER_MODELS": f"tiny={tiny_model_dir}",
        }
        workers = [
            services.add(start_celery_worker("lmref.production.celery_worker", n, env, wait=False))
            for n in ("f1", "f2")
        ]
        config = ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[KEY])
        shared = SharedServices(
            broker_url=rabbit.url, store_url=store_redis.url, sweep_interval_s=0
        )
        handle = start_in_thread(build_app(config, shared), config, port=0)
        for worker in workers:
            worker.wait_for_text(READY_LINE, timeout=120)
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key=KEY, max_retries=0)
        state = {"redis": store_redis, "services": services, "dir": store_dir}
        yield handle, client, state, rabbit
        handle.stop(drain_timeout=5)


def submit(client, custom_ids: list[str], tmp_path, max_tokens: int = 48):
    lines = [
        {
            "custom_id": c,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": c}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "n": 4,
            },
        }
        for c in custom_ids
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return found


def lines_of(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def answered_503_fast(client, batch_id: str) -> float:
    """The API's answer while the store is out: a 503 in OpenAI's shape with Retry-After."""
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client.batches.retrieve(batch_id)
    took = time.monotonic() - started
    assert err.value.status_code == 503 and err.value.response.headers["Retry-After"] == "5"
    assert err.value.body["code"] == "store_unavailable", err.value.body
    return took


@needs_servers
@pytest.mark.integration
def test_store_frozen_then_restarted_mid_batch_loses_nothing(pipeline, tmp_path):
    handle, client, state, _ = pipeline
    ids = [f"req-{i}" for i in range(14)]
    batch = submit(client, ids, tmp_path)
    assert batch.status == "in_progress"
    store = Store(state["redis"].url)
    wait_for(lambda: len(store.done_ids(batch.id)) >= 2, 60, "no request finished")
    # Listed with its counts as they are now, not as they were stored at create.
    listed = next(b for b in client.batches.list(limit=5) if b.id == batch.id)
    assert listed.request_counts.completed >= 2

    # 1. Frozen (SIGSTOP: connections accepted, no answer) for 4 s.
    with frozen(state["redis"]):
        assert answered_503_fast(client, batch.id) < 3.5  # the 2 s socket timeout, not a hang
        time.sleep(2.5)
        # Each worker holds at most the one message it runs: the rest wait in RabbitMQ.
        depth = handle.app.extensions["lmref_batch"].sweeper.queue_depth()
    done_before_stop = len(store.done_ids(batch.id))
    assert depth >= 14 - done_before_stop - 2 - 2, depth

    # 2. Stopped (its append-only file written), down for 4 s, started again on its port.
    wait_for(lambda: len(store.done_ids(batch.id)) >= done_before_stop + 2, 60, "no progress")
    port = state["redis"].port
    state["redis"].stop()
    took = answered_503_fast(client, batch.id)
    assert took < 1.0  # refused at once
    time.sleep(4)
    state["redis"] = state["services"].add(
        start_redis(args=store_args(), port=port, workdir=state["dir"])
    )
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    seen = collections.Counter(x["custom_id"] for x in output + errors)
    assert [x["custom_id"] for x in output] == ids and not errors  # each once, in order
    assert set(seen.values()) == {1} and batch.request_counts.completed == 14
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert handle.app.extensions["lmref_batch"].sweeper.sweep().lost == 0


@needs_servers
@pytest.mark.integration
def test_lost_messages_are_found_by_the_sweeper(pipeline, tmp_path):
    """A batch whose messages vanished (stored, nothing queued: what a create used to leave when
    its broker failed) is queued again by the sweeper and completes; with no requeue left, its
    requests fail as lost and the batch still completes, saying how many."""
    handle, client, state, _ = pipeline
    from lmref.production.batch_api import new_batch
    from lmref.production.sweeper import Sweeper
    from lmref.serving.auth import key_id_of

    api = handle.app.extensions["lmref_batch"]
    store = api.store
    uploaded = client.files.create(
        file=(
            "r.jsonl",
            "".join(
                json.dumps(
                    {
                        "custom_id": c,
                        "url": "/v1/chat/completions",
                        "body": {"model": "tiny", "messages": [{"role": "user", "content": c}]},
                    }
                )
                + "\n"
                for c in ("a", "b", "c")
            ).encode(),
        ),
        purpose="batch",
    )

    def orphan() -> str:
        # The key's own batch: another owner's would be a 404 to the client.
        batch = new_batch("/v1/chat/completions", uploaded.id, 3, None, key_id_of(KEY))
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        store.put_batch(batch, ["a", "b", "c"])
        return batch["id"]

    recovered, lost = orphan(), orphan()
    # Not yet stalled: nothing done.
    assert api.sweeper.sweep().requeued == {}
    report = api.sweeper.sweep(now=time.time() + 1, stall_s=0)
    assert report.requeued == {recovered: 3, lost: 3} and report.lost == 0
    done = wait_for(
        lambda: (b := client.batches.retrieve(recovered)).status == "completed" and b, 60, "stuck"
    )
    assert done.request_counts.completed == 3
    assert [x["custom_id"] for x in lines_of(client, done.output_file_id)] == ["a", "b", "c"]

    # The second orphan also ran; a third with its requeues used up fails as lost.
    never = orphan()
    for _ in range(api.config.max_requeues):
        store.requeued(never)
    no_queue = Sweeper(store, api.config, queue_depth=lambda: 0, requeue=api.sweeper.requeue)
    report = no_queue.sweep(now=time.time() + 1, stall_s=0)
    assert report.lost == 3 and never in report.completed
    failed = client.batches.retrieve(never)
    assert failed.status == "completed" and failed.request_counts.failed == 3
    errors = lines_of(client, failed.error_file_id)
    assert {e["error"]["code"] for e in errors} == {"request_lost"}
    # A queue that holds messages (or cannot be read) stops the sweeper from guessing.
    waiting = Sweeper(store, api.config, queue_depth=lambda: 5, requeue=api.sweeper.requeue)
    assert waiting.sweep(now=time.time() + 1, stall_s=0).requeued == {}


@needs_servers
@pytest.mark.integration
def test_ids_that_name_other_keys_are_404s(pipeline):
    _, client, _, _ = pipeline
    batch_id = "batch_" + "0" * 32
    for bad in (batch_id + ":order", "batch_*", f"{batch_id}:results"):
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(bad)
    for bad in ("file:batch_x", "file-" + "0" * 32 + ":content"):
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(bad)
    with pytest.raises(openai.BadRequestError, match="at most 16"):
        client.batches.create(
            input_file_id="file-" + "0" * 32,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={str(i): "v" for i in range(17)},
        )


@needs_servers
@pytest.mark.integration
def test_create_while_the_broker_is_down_is_a_503_and_no_orphan(pipeline, tiny_model_dir, tmp_path):
    """A replica whose broker refuses connections: the upload works (the store is up), the
    create answers 503 with Retry-After within seconds, and the batch it stored is failed,
    saying why, not left in progress waiting for messages that were never queued."""
    from lmref.serve import SharedServices, start_server
    from lmref.serving.app import ModelSpec, ServingConfig

    _, _, state, _ = pipeline
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    handle = start_server(
        ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[KEY]),
        shared=SharedServices(broker_url=down, store_url=state["redis"].url),
    )
    try:
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key=KEY, max_retries=0)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            submit(client, ["x"], tmp_path)
        assert time.monotonic() - started < 10
        assert err.value.status_code == 503 and err.value.response.headers["Retry-After"]
        assert err.value.body["code"] == "queue_unavailable"
        newest = client.batches.list(limit=1).data[0]
        assert newest.status == "failed" and newest.errors.data[0].code == "queue_unavailable"
        store = Store(state["redis"].url)
        assert newest.id not in store.live_batch_ids()  # nothing for the sweeper to wait on
    finally:
        handle.stop(drain_timeout=2)
