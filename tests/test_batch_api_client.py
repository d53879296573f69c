"""The Batch API as the official ``openai`` client uses it, against real Redis, RabbitMQ and a
Celery worker on 127.0.0.1: list pagination through the client's auto-pager (every batch and
file exactly once, newest first, ``order`` and ``purpose`` on files), ``metadata`` round trips
and its limits, a cancel mid-batch whose counts are exact at every step, and the deletion of
the input file of a running batch (allowed, as OpenAI does: the batch runs on from its copy).
Each test uses a key of its own, so each tenant's lists hold that test's objects only."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import requests

pytest.importorskip("celery")
pytest.importorskip("redis")
openai = pytest.importorskip("openai")

from test_tenants import create, lines, upload, wait_status  # noqa: E402  (the same helpers)

from lmref.lab.servers import start_celery_worker, start_rabbitmq, start_redis  # noqa: E402
from lmref.lab.services import Services  # noqa: E402

pytestmark = [
    pytest.mark.integration,  # Redis, RabbitMQ, a Celery worker, a replica
    pytest.mark.skipif(
        not shutil.which("redis-server")
        or not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists(),
        reason="redis-server and rabbitmq-server come from Debian (make system)",
    ),
]
KEYS = ("sk-list", "sk-files", "sk-cancel", "sk-delete")


@pytest.fixture(scope="module")
def deployment(tiny_model_dir):
    """Redis, RabbitMQ, one replica (this process, no sweeper), one worker; a client per key."""
    from lmref.production.store import Store
    from lmref.production.worker import READY_LINE
    from lmref.serve import SharedServices, start_server
    from lmref.serving.app import ModelSpec, ServingConfig

    with Services() as services:
        redis_, rabbit = services.add(start_redis()), services.add(start_rabbitmq())
        env = {
            "LMREF_BROKER_URL": rabbit.url,
            "LMREF_STORE_URL": redis_.url,
            "LMREF_WORKER_MODELS": f"tiny={tiny_model_dir}",
        }
        worker = services.add(
            start_celery_worker("lmref.production.celery_worker", "w1", env, wait=False)
        )
        handle = start_server(
            ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=list(KEYS)),
            shared=SharedServices(broker_url=rabbit.url, store_url=redis_.url, sweep_interval_s=0),
        )
        worker.wait_for_text(READY_LINE, timeout=120)
        clients = {
            key: openai.OpenAI(base_url=handle.url + "/v1", api_key=key, max_retries=0)
            for key in KEYS
        }
        yield handle, clients, Store(redis_.url)
        handle.stop(drain_timeout=5)


def test_batches_list_pages_newest_first_and_keeps_metadata(deployment, tmp_path):
    handle, clients, _ = deployment
    client = clients["sk-list"]
    file_id = upload(client, lines("l", 1), tmp_path).id
    made = [create(client, file_id, metadata={"n": str(i), "run": "pages"}) for i in range(7)]
    newest_first = [b.id for b in reversed(made)]

    # The auto-pager follows `after` until has_more is false: each batch exactly once.
    paged = list(client.batches.list(limit=3))
    assert [b.id for b in paged] == newest_first
    assert [b.metadata for b in paged] == [{"n": str(i), "run": "pages"} for i in range(6, -1, -1)]
    raw = requests.get(
        handle.url + "/v1/batches",
        params={"limit": 3, "after": newest_first[2]},
        headers={"Authorization": "Bearer sk-list"},
        timeout=10,
    ).json()
    assert [b["id"] for b in raw["data"]] == newest_first[3:6] and raw["has_more"] is True
    assert (raw["first_id"], raw["last_id"]) == (newest_first[3], newest_first[5])
    last = client.batches.list(limit=3, after=newest_first[5])
    assert [b.id for b in last.data] == newest_first[6:] and last.has_more is False
    assert client.batches.retrieve(made[4].id).metadata == {"n": "4", "run": "pages"}

    # OpenAI's limits on metadata: a 400 that names what is wrong, nothing created.
    bad = {
        "too many": {f"k{i}": "v" for i in range(17)},
        "k" * 65: {"k" * 65: "v"},
        "'n' must be a string": {"n": 3},
        "'long' has 513": {"long": "v" * 513},
    }
    for named, metadata in bad.items():
        with pytest.raises(openai.BadRequestError) as caught:
            create(client, file_id, metadata=metadata)
        message = caught.value.body["message"]
        assert caught.value.param == "metadata" and (named[:20] in message or "17 pairs" in message)
    assert len(list(client.batches.list(limit=100))) == 7


def test_files_list_pages_filters_by_purpose_and_orders(deployment, tmp_path):
    _, clients, _ = deployment
    client = clients["sk-files"]
    uploads = [upload(client, lines(f"f{i}", 1), tmp_path).id for i in range(5)]
    done = wait_status(client, create(client, uploads[0]).id, ("completed",), timeout=60)
    assert done.output_file_id

    # The purpose filter runs before the limit: pages of 2 uploads, never short or empty.
    assert [f.id for f in client.files.list(limit=2, purpose="batch")] == uploads[::-1]
    assert [f.id for f in client.files.list(limit=2, purpose="batch", order="asc")] == uploads
    first = client.files.list(limit=2, purpose="batch")
    assert [f.id for f in first.data] == uploads[:2:-1] and first.has_more is True
    assert [f.id for f in client.files.list(purpose="batch_output")] == [done.output_file_id]
    assert [f.id for f in client.files.list(limit=1)] == [done.output_file_id, *uploads[::-1]]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(order="sideways")
    assert caught.value.param == "order"

    deleted = client.files.delete(uploads[2])
    assert (deleted.id, deleted.deleted) == (uploads[2], True)
    assert [f.id for f in client.files.list(limit=2, purpose="batch")] == [
        uploads[4],
        uploads[3],
        uploads[1],
        uploads[0],
    ]
    with pytest.raises(openai.NotFoundError):
        client.files.delete(uploads[2])


def test_cancel_mid_batch_counts_exactly(deployment, tmp_path):
    _, clients, store = deployment
    client = clients["sk-cancel"]
    total = 40
    batch = create(client, upload(client, lines("c", total, max_tokens=8), tmp_path).id)
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline, "no request finished"
        time.sleep(0.02)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    seen = [cancelling.request_counts]
    while (now := client.batches.retrieve(batch.id)).status == "cancelling":
        seen.append(now.request_counts)
        time.sleep(0.02)
    assert now.status == "cancelled" and now.cancelled_at and now.completed_at is None
    seen.append(now.request_counts)
    # At every step: never more than the total, never fewer than a step before.
    for before, after in zip(seen, seen[1:]):
        assert after.total == total and before.completed <= after.completed
        assert after.completed + after.failed <= total

    counts = now.request_counts
    not_run = total - counts.completed - counts.failed
    assert counts.completed >= 2 and not_run > 0  # the lines not yet run were not run
    output = client.files.content(now.output_file_id).text.splitlines()
    errors = client.files.content(now.error_file_id).text.splitlines() if now.error_file_id else []
    assert (len(output), len(errors)) == (counts.completed, counts.failed)
    time.sleep(1.0)  # the skipped requests leave the queue; none of them runs after the end
    assert len(store.done_ids(batch.id)) == counts.completed + counts.failed
    assert client.batches.retrieve(batch.id).request_counts == counts
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: as it is


def test_deleting_a_running_batchs_input_file_is_allowed(deployment, tmp_path):
    """As OpenAI: the delete succeeds, the batch runs on from its own copy of the requests
    (which the sweeper requeues lost requests from), and its input_file_id becomes a 404."""
    _, clients, store = deployment
    client = clients["sk-delete"]
    items = lines("d", 12)
    uploaded = upload(client, items, tmp_path)
    batch = create(client, uploaded.id)
    assert client.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert store.file_content(uploaded.id) is None
    copy = store.batch_input(batch.id, uploaded.id)
    assert [json.loads(x)["custom_id"] for x in copy.decode().splitlines()] == [
        x["custom_id"] for x in items
    ]
    done = wait_status(client, batch.id, ("completed",), timeout=60)
    assert (done.request_counts.completed, done.input_file_id) == (12, uploaded.id)
    assert len(client.files.content(done.output_file_id).text.splitlines()) == 12
