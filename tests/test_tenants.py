"""Tenants of one deployment, against real Redis, RabbitMQ and a Celery worker on 127.0.0.1:
two keys, each its own tenant, through the official ``openai`` client. The second key cannot
see, read, use, cancel or delete the first's files and batches (a 404, the same as an unknown
id); cancel and delete work for the owner; one key's big batch does not hold back another's one
line (RabbitMQ priorities, measured against plain FIFO); the response cache never answers one
key with another's entry unless the deployment shares it."""

from __future__ import annotations

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

from lmref.lab.servers import start_celery_worker, start_rabbitmq, start_redis  # noqa: E402
from lmref.lab.services import Services  # noqa: E402
from lmref.production.fair_queue import MAX_PRIORITY, priorities  # noqa: E402

KEY_A, KEY_B = "sk-a", "sk-b"
needs_servers = pytest.mark.skipif(
    not shutil.which("redis-server") or not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists(),
    reason="redis-server and rabbitmq-server come from Debian (make system)",
)


@pytest.mark.unit
def test_priorities_fall_with_the_backlog():
    assert priorities(0, 1) == [MAX_PRIORITY]  # nothing waiting: first in line
    assert priorities(0, 4) == [9, 8, 7, 7]  # a batch's own lines count as its backlog
    assert priorities(10_000, 1) == [0] and priorities(3, 1) == [MAX_PRIORITY - 2]


@pytest.fixture(scope="module")
def deployment(tiny_model_dir):
    """Redis, RabbitMQ, one replica (this process) with two keys, one worker (concurrency 1)."""
    from lmref.production.worker import READY_LINE
    from lmref.serve import SharedServices, start_server
    from lmref.serving.app import ModelSpec, ServingConfig

    with Services() as services:
        redis_, rabbit = services.add(start_redis()), services.add(start_rabbitmq())
        handle = start_server(
            ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[KEY_A, KEY_B]),
            shared=SharedServices(
                cache_url=redis_.url.replace("/0", "/2"),
                broker_url=rabbit.url,
                store_url=redis_.url,
                sweep_interval_s=0,
            ),
        )
        env = {
            "LMREF_BROKER_URL": rabbit.url,
            "LMREF_STORE_URL": redis_.url,
            "LMREF_WORKER_MODELS": f"tiny={tiny_model_dir}",
        }
        worker = services.add(start_celery_worker("lmref.production.celery_worker", "w1", env))
        worker.wait_for_text(READY_LINE, timeout=120)
        clients = {
            key: openai.OpenAI(base_url=handle.url + "/v1", api_key=key, max_retries=0)
            for key in (KEY_A, KEY_B)
        }
        yield handle, clients[KEY_A], clients[KEY_B], rabbit
        handle.stop(drain_timeout=5)


def lines(prefix: str, count: int, max_tokens: int = 4) -> list[dict]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"{prefix} {i}"}],
                "temperature": 0,
                "max_tokens": max_tokens,
                "ignore_eos": True,
            },
        }
        for i in range(count)
    ]


def upload(client, items: list[dict], tmp_path: Path):
    path = tmp_path / f"requests-{time.monotonic_ns()}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return client.files.create(file=path.open("rb"), purpose="batch")


def create(client, file_id: str, **kw):
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **kw
    )


def wait_status(client, batch_id: str, statuses: tuple[str, ...], timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch not {statuses}: {batch}"
        time.sleep(0.05)


def not_found(call, *args, **kwargs) -> dict:
    """The 404 body a call gets (it must get one)."""
    with pytest.raises(openai.NotFoundError) as caught:
        call(*args, **kwargs)
    return caught.value.body


@needs_servers
@pytest.mark.integration
def test_a_second_key_cannot_see_read_use_cancel_or_delete_the_firsts(deployment, tmp_path):
    _, a, b, _ = deployment
    a_file = upload(a, lines("a", 2), tmp_path)
    a_batch = create(a, a_file.id)
    done = wait_status(a, a_batch.id, ("completed",))
    assert done.output_file_id and done.request_counts.completed == 2
    b_file = upload(b, lines("b", 1), tmp_path)

    unknown_file, unknown_batch = "file-" + "0" * 32, "batch_" + "0" * 32
    for file_id in (a_file.id, done.output_file_id):
        # The very answer an unknown id gets, but for the id: nothing tells that it exists.
        same = not_found(b.files.retrieve, unknown_file)
        assert json.dumps(not_found(b.files.retrieve, file_id)) == json.dumps(same).replace(
            unknown_file, file_id
        )
        not_found(b.files.content, file_id)
        not_found(b.files.delete, file_id)
    same = not_found(b.batches.retrieve, unknown_batch)
    assert json.dumps(not_found(b.batches.retrieve, a_batch.id)) == json.dumps(same).replace(
        unknown_batch, a_batch.id
    )
    not_found(b.batches.cancel, a_batch.id)
    with pytest.raises(openai.NotFoundError) as caught:  # A's file as B's batch input
        create(b, a_file.id)
    assert (caught.value.code, caught.value.param) == ("file_not_found", "file_id")

    # B's lists hold B's only; A still sees all of its own (input and output files).
    assert [x.id for x in b.batches.list()] == []
    assert [x.id for x in b.files.list()] == [b_file.id]
    assert a_batch.id in [x.id for x in a.batches.list()]
    assert {a_file.id, done.output_file_id} <= {x.id for x in a.files.list()}
    assert a.files.content(done.output_file_id).text.count("\n") == 2
    assert "owner" not in a.files.retrieve(a_file.id).model_dump()
    assert "owner" not in a.batches.retrieve(a_batch.id).model_dump()

    # Delete works for the owner, once; A's batch survives its input file's deletion.
    deleted = a.files.delete(a_file.id)
    assert (deleted.id, deleted.deleted) == (a_file.id, True)
    not_found(a.files.retrieve, a_file.id)
    not_found(a.files.delete, a_file.id)
    assert a_file.id not in [x.id for x in a.files.list()]
    assert a.batches.retrieve(a_batch.id).status == "completed"
    with pytest.raises(openai.ConflictError):  # a completed batch cannot be cancelled
        a.batches.cancel(a_batch.id)


@needs_servers
@pytest.mark.integration
def test_cancel_skips_queued_requests_and_keeps_what_finished(deployment, tmp_path):
    _, a, _, _ = deployment
    batch = create(a, upload(a, lines("c", 60, max_tokens=8), tmp_path).id)
    wait_status(a, batch.id, ("in_progress",))
    deadline = time.monotonic() + 60
    while a.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cancelling = a.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    ended = wait_status(a, batch.id, ("cancelled",), timeout=30)
    counts = ended.request_counts
    assert ended.cancelled_at and 2 <= counts.completed < counts.total == 60
    output = [json.loads(x) for x in a.files.content(ended.output_file_id).text.splitlines()]
    assert len(output) == counts.completed  # the output of what finished, in input order
    assert [x["custom_id"] for x in output] == [f"c-{i}" for i in range(len(output))]
    time.sleep(0.5)  # the skipped requests leave the queue without results
    assert a.batches.retrieve(batch.id).request_counts.completed == counts.completed
    assert a.batches.cancel(batch.id).status == "cancelled"  # again: as it is


def small_waits_behind_big(a, b, tmp_path, big: int, run: str) -> tuple[float, int]:
    """Key A queues ``big`` requests, then key B one: B's wait and A's results by then
    (``run``: new prompts each time, so no answer comes from the worker's cache)."""
    # 64 tokens a line: long enough that A's batch outlasts the polling around B's (at 16, the
    # faster decode of 2026-12 finished 32 of A's 100 lines while B's one was being polled for).
    a_batch = create(a, upload(a, lines(f"big-{run}", big, max_tokens=64), tmp_path).id)
    deadline = time.monotonic() + 60
    while a.batches.retrieve(a_batch.id).request_counts.completed < 1:  # the worker is busy
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    b_batch = create(b, upload(b, lines(f"small-{run}", 1), tmp_path).id)
    wait_status(b, b_batch.id, ("completed",), timeout=180)
    waited = time.monotonic() - started
    a_done = a.batches.retrieve(a_batch.id).request_counts.completed
    wait_status(a, a_batch.id, ("completed",), timeout=180)
    return waited, a_done


@needs_servers
@pytest.mark.integration
def test_one_keys_big_batch_does_not_hold_back_anothers_one_line(deployment, tmp_path, monkeypatch):
    _, a, b, _ = deployment
    big = 100
    fair_wait, fair_a_done = small_waits_behind_big(a, b, tmp_path, big, "fair")
    # The baseline: every message one priority, as one FIFO queue was.
    monkeypatch.setattr(
        "lmref.production.celery_app.priorities", lambda backlog, count: [0] * count
    )
    fifo_wait, fifo_a_done = small_waits_behind_big(a, b, tmp_path, big, "fifo")
    print(
        f"\nB's one line behind A's {big}: fair {fair_wait:.2f} s ({fair_a_done} of A's done), "
        f"FIFO {fifo_wait:.2f} s ({fifo_a_done} of A's done)"
    )
    assert fair_a_done < big // 4  # B ran while most of A's batch still waited
    assert fifo_a_done == big  # without priorities B waited for all of A's
    assert fair_wait < fifo_wait / 3


def _metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


@needs_servers
@pytest.mark.integration
def test_the_response_cache_never_answers_one_key_with_anothers_entry(deployment):
    handle, *_ = deployment
    body = {"model": "tiny", "prompt": "def tenant(", "max_tokens": 6, "temperature": 0}

    def ask(key: str) -> tuple[float, float]:
        before = [
            _metric(handle.url, f"lmref:response_cache_{k}_total") for k in ("hits", "misses")
        ]
        response = requests.post(
            handle.url + "/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert response.status_code == 200
        after = [_metric(handle.url, f"lmref:response_cache_{k}_total") for k in ("hits", "misses")]
        return after[0] - before[0], after[1] - before[1]

    assert ask(KEY_A) == (0, 1)  # A: generated
    assert ask(KEY_A) == (1, 0)  # A again: its own entry
    assert ask(KEY_B) == (0, 1)  # B, the same greedy request: not A's entry
    assert ask(KEY_B) == (1, 0)


@pytest.mark.integration
def test_a_shared_response_cache_answers_across_keys_when_the_deployment_says_so(
    tiny_model_dir,
):
    from lmref.serving.app import ModelSpec, ServingConfig, create_app

    body = {"model": "tiny", "prompt": "def shared(", "max_tokens": 6, "temperature": 0}
    for shared, b_hits in ((True, 1), (False, 0)):
        config = ServingConfig(
            models=[ModelSpec("tiny", str(tiny_model_dir))],
            api_keys=[KEY_A, KEY_B],
            load_in_background=False,
            shared_response_cache=shared,
        )
        app = create_app(config)
        client = app.test_client()
        answers = []
        for key in (KEY_A, KEY_B):
            reply = client.post(
                "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert reply.status_code == 200, reply.json
            answers.append(reply.json["choices"][0]["text"])
        metrics = client.get("/metrics").get_data(as_text=True)
        hits = sum(
            float(v)
            for v in re.findall(r"^lmref:response_cache_hits_total\{[^}]*\} (\S+)$", metrics, re.M)
        )
        assert hits == b_hits and answers[0] == answers[1]
        app.extensions["lmref"].close()


@needs_servers
@pytest.mark.integration
def test_a_queue_without_priorities_is_a_clear_startup_error(deployment):
    from kombu import Connection

    from lmref.production.celery_app import BatchConfig, make_celery
    from lmref.production.fair_queue import QueueMismatch, check_queue

    rabbit = deployment[3]
    with Connection(rabbit.url) as conn:  # as an older lmref declared it
        conn.default_channel.queue_declare("lmref-old", durable=True, auto_delete=False)
    celery = make_celery(BatchConfig(broker_url=rabbit.url, queue="lmref-old"), producer=True)
    with pytest.raises(QueueMismatch, match="rabbitmqctl delete_queue lmref-old"):
        check_queue(celery, "lmref-old")
    check_queue(celery, "lmref-new")  # a new name is declared with priorities
