"""The OpenAI Batch API in a server replica: files and batches over the Redis store, one Celery
message per request for the workers (``lmref.production.worker``).

``register_batch_api(app, BatchConfig(...))`` adds ``POST /v1/files`` (upload a JSONL of
requests), ``GET /v1/files``, ``GET /v1/files/{id}[/content]``, ``DELETE /v1/files/{id}``,
``POST /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel`` and
``GET /v1/batches`` to a server app (behind its API keys), so the official ``openai`` client's
``files.create`` / ``.list`` / ``.content`` / ``.delete`` and ``batches.create`` / ``.retrieve``
/ ``.list`` / ``.cancel`` work unchanged, and exports the queue depth (``lmref:batch_queue_depth``, messages waiting in RabbitMQ) on
``/metrics`` for an autoscaler. The replica's producer Celery app is built there, once. An
upload is bounded by the server's ``--max-content-length`` (1 MiB by default: raise it for large
batch files). ``python -m lmref.serve --broker-url ... --store-url ...`` does this.

Tenants: every file and batch belongs to the caller's ``Principal.owner`` (a batch's output and
error files too). Another tenant's id, on read, list, content, use as ``input_file_id``, cancel
or delete, is the same 404 as an unknown id; the owner is never in a returned object. Each
batch's messages carry priorities from its owner's backlog (``lmref.production.fair_queue``).

Usage::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    batch_file = client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = client.batches.retrieve(batch.id)          # ... until batch.status == "completed"
    print(client.files.content(batch.output_file_id).text)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from celery import Celery
from flask import Blueprint, Flask, current_app, request
from kombu.exceptions import OperationalError
from prometheus_client.core import GaugeMetricFamily

from lmref.production.batch_input import bad_request, check_metadata, parse_requests
from lmref.production.celery_app import BatchConfig, make_celery, send_requests
from lmref.production.connections import STORE_ERRORS
from lmref.production.fair_queue import check_queue
from lmref.production.files import public
from lmref.production.store import Store, batch_id_ok, file_id_ok, new_batch_id
from lmref.production.sweeper import Sweeper
from lmref.serving.audit import current_request_id
from lmref.serving.current import current_principal
from lmref.serving.guards import error_response
from lmref.serving.schema import APIError
from lmref.serving.state import EXTENSION

log = logging.getLogger("lmref.production.batch_api")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")  # what lmref.serving.service answers
BATCH_EXTENSION = "lmref_batch"  # app.extensions key of the BatchAPI
batches = Blueprint("batch_api", __name__)


@dataclass
class BatchAPI:
    """What the Batch API routes of one app use: its config, store and producer app."""

    config: BatchConfig
    store: Store
    celery: Celery
    sweeper: Sweeper


def batch_api() -> BatchAPI:
    """The Batch API of the app handling the current request."""
    return current_app.extensions[BATCH_EXTENSION]


class QueueDepthCollector:
    """``lmref:batch_queue_depth`` (messages waiting in RabbitMQ) and
    ``lmref:batch_queue_consumers``, read from the broker at each scrape."""

    def __init__(self, celery: Celery, queue: str):
        self.celery, self.queue = celery, queue

    def collect(self):
        depth = GaugeMetricFamily(
            "lmref:batch_queue_depth",
            "Batch requests waiting in the queue (not yet taken by a worker)",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "lmref:batch_queue_consumers", "Workers consuming the queue", labels=["queue"]
        )
        found = self.read()
        if found is not None:
            depth.add_metric([self.queue], found[0])
            consumers.add_metric([self.queue], found[1])
        yield depth
        yield consumers

    def read(self) -> tuple[int, int] | None:
        """(messages waiting, consumers), or None when the broker cannot say (down, no queue)."""
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                _, messages, listeners = conn.default_channel.queue_declare(
                    self.queue, passive=True
                )
            return messages, listeners
        except Exception as exc:  # no queue yet, broker down: the scrape still succeeds
            log.debug("queue depth unavailable: %s", exc)
            return None

    def waiting(self) -> int | None:
        found = self.read()
        return None if found is None else found[0]


def owner() -> str:
    """The tenant of the current request: what it creates is its own, and it sees only that."""
    return current_principal().owner


def _not_found(kind: str, ident: str) -> APIError:
    """OpenAI's 404 for a batch or a file id that is not in the store, or not the caller's:
    the same answer, so nobody learns that another tenant's id exists."""
    return APIError(
        404,
        f"No {kind} with id '{ident}'",
        "not_found_error",
        param=f"{kind}_id",
        code=f"{kind}_not_found",
    )


def batch_or_404(batch_id: str) -> dict:
    """The caller's batch, its counts as they are now; a 404 for an unknown id, another
    tenant's, or one not in the form this server gives out (checked before it reaches a Redis
    key)."""
    store = batch_api().store
    if not batch_id_ok(batch_id) or store.batch(batch_id, owner()) is None:
        raise _not_found("batch", batch_id)
    return store.finalize(batch_id) or {}


def file_or_404(file_id: str) -> dict:
    """The caller's file (stored metadata); a 404 as for a batch."""
    meta = batch_api().store.file(file_id, owner()) if file_id_ok(file_id) else None
    if meta is None:
        raise _not_found("file", file_id)
    return meta


def page_of(items: list[dict], more: bool) -> dict:
    """OpenAI's list object (the cursor is the last id)."""
    data = [public(x) for x in items]
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def limit_arg(most: int, default: int) -> int:
    limit = request.args.get("limit", str(default))
    if not limit.isdigit() or not 1 <= int(limit) <= most:
        raise bad_request(f"'limit' must be an integer from 1 to {most}", "limit")
    return int(limit)


@batches.post("/v1/files")
def upload():
    upload = request.files.get("file")
    if upload is None:
        raise bad_request("a multipart form field 'file' is required", "file")
    purpose = request.form.get("purpose")
    if purpose != "batch":
        raise bad_request(f"'purpose' must be 'batch' (got {purpose!r})", "purpose")
    store = batch_api().store
    return public(
        store.put_file(upload.read(), upload.filename or "upload.jsonl", purpose, "", owner())
    )


@batches.get("/v1/files")
def list_files():
    """The caller's files, newest first (``purpose``, ``limit``, ``after``, ``order`` as
    OpenAI's)."""
    limit, after = limit_arg(10_000, 10_000), request.args.get("after")
    if after is not None and not file_id_ok(after):
        raise bad_request("'after' must be a file id", "after")
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request(f"'order' must be 'asc' or 'desc' (got {order!r})", "order")
    files, more = batch_api().store.list_files(
        owner(), after, limit, request.args.get("purpose"), ascending=order == "asc"
    )
    return page_of(files, more)


@batches.get("/v1/files/<file_id>")
def file_meta(file_id: str):
    return public(file_or_404(file_id))


@batches.delete("/v1/files/<file_id>")
def delete_file(file_id: str):
    """Delete the caller's file, as OpenAI does even when a live batch reads it: the batch runs
    on from its own copy (``Store.put_batch``), its ``input_file_id`` then names a 404."""
    if not file_id_ok(file_id) or not batch_api().store.delete_file(file_id, owner()):
        raise _not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@batches.get("/v1/files/<file_id>/content")
def file_content(file_id: str):
    file_or_404(file_id)
    content = batch_api().store.file_content(file_id) or b""
    return content, 200, {"Content-Type": "application/jsonl"}


def new_batch(
    endpoint: str,
    file_id: str,
    total: int,
    metadata: dict | None,
    owner: str = "anonymous",
    request_id: str = "",
) -> dict:
    """A batch object as OpenAI writes one, ``validating`` until its requests are queued, with
    its ``owner`` (kept in the store, never returned: ``public``) and ``request_id``, the
    X-Request-ID that created it (the worker logs it with each request)."""
    now = int(time.time())
    return {
        "owner": owner,
        "id": new_batch_id(),
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": file_id,
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + 24 * 3600,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "metadata": metadata,
        "request_id": request_id or None,
    }


@batches.post("/v1/batches")
def create_batch():
    """Validate, store the batch as ``validating``, queue one message per request, then mark it
    ``in_progress``. A broker that fails mid-way: the batch is marked ``failed`` (so no worker
    keeps a result for it) and the client gets a 503 to retry; a replica that dies mid-way
    leaves it ``validating``, which the sweeper fails. Never a batch that waits for messages
    that do not exist."""
    api = batch_api()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise bad_request(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", "endpoint")
    if body.get("completion_window") != "24h":
        raise bad_request("'completion_window' must be '24h'", "completion_window")
    metadata = check_metadata(body.get("metadata"), api.config.job_time_limit_s)
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise bad_request("'input_file_id' must be a file id", "input_file_id")
    file_or_404(file_id)
    content = api.store.file_content(file_id) or b""
    requests = parse_requests(content, endpoint, file_id, api.config.max_requests)
    batch = new_batch(endpoint, file_id, len(requests), metadata, owner(), current_request_id())
    backlog = api.store.backlog(owner())  # before this batch: its priorities start from here
    api.store.put_batch(batch, [r["custom_id"] for r in requests], content)
    try:
        send_requests(
            api.celery,
            api.config,
            batch["id"],
            endpoint,
            requests,
            api.config.time_limit(metadata),
            backlog,
        )
    except OperationalError as exc:
        api.store.fail_batch(batch["id"], "queue_unavailable", str(exc))
        raise unavailable("queue", exc, api.config) from None
    # A cancel that came meanwhile stands: only a batch still validating starts running.
    started = api.store.update_batch(
        batch["id"], ("validating",), status="in_progress", in_progress_at=int(time.time())
    )
    return public(started or batch)


@batches.get("/v1/batches/<batch_id>")
def retrieve_batch(batch_id: str):
    return public(batch_or_404(batch_id))


@batches.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """OpenAI's cancel: ``cancelling`` at once, ``cancelled`` when no request of it runs any
    more, with the output of what finished; a batch that already ended is a 409."""
    batch = batch_api().store.cancel(batch_id, owner()) if batch_id_ok(batch_id) else None
    if batch is None:
        raise _not_found("batch", batch_id)
    if batch["status"] in ("completed", "failed", "expired"):
        raise APIError(
            409,
            f"Cannot cancel a batch with status '{batch['status']}'",
            param="batch_id",
            code="batch_not_cancellable",
        )
    return public(batch)


@batches.get("/v1/batches")
def list_batches():
    """The caller's batches, newest first."""
    limit, after = limit_arg(100, 20), request.args.get("after")
    if after is not None and not batch_id_ok(after):
        raise bad_request("'after' must be a batch id", "after")
    store = batch_api().store
    ids = store.batch_ids(after, limit + 1, owner())
    # finalize: each running batch's counts as they are now, not as they were stored
    page = [b for b in (store.finalize(i) for i in ids[:limit]) if b]
    return page_of(page, len(ids) > limit)


def unavailable(what: str, exc: Exception, config: BatchConfig) -> APIError:
    """A 503 in OpenAI's shape with ``Retry-After``: the store or the queue is down, frozen or
    full. Nothing was lost; the client retries."""
    return APIError(
        503,
        f"the batch {what} is unavailable ({type(exc).__name__}); retry in "
        f"{config.store_retry_after_s} s",
        "service_unavailable_error",
        code=f"{what}_unavailable",
        headers={"Retry-After": str(config.store_retry_after_s)},
    )


def store_unavailable(exc: Exception):
    log.warning("batch store unavailable: %s", exc)
    return error_response(unavailable("store", exc, batch_api().config))


def queue_unavailable(exc: Exception):
    log.warning("batch queue unavailable: %s", exc)
    return error_response(unavailable("queue", exc, batch_api().config))


for _error in STORE_ERRORS:
    batches.register_error_handler(_error, store_unavailable)
batches.register_error_handler(OperationalError, queue_unavailable)


def register_batch_api(app: Flask, config: BatchConfig) -> Store:
    """Add the Files and Batches routes to a server app (``lmref.serving.app.create_app``), behind
    its API keys, and the queue depth gauge to its ``/metrics``. Builds this replica's producer
    Celery app (the one it has) and starts its sweeper (``lmref.production.sweeper``), which
    stops when the server drains."""
    store = Store(config.store_url, config.ttl_s)
    celery = make_celery(config, producer=True)
    check_queue(celery, config.queue)  # a queue without priorities: a clear error, now
    depth = QueueDepthCollector(celery, config.queue)
    state = app.extensions[EXTENSION]
    state.metrics.registry.register(depth)
    sweeper = Sweeper(
        store,
        config,
        queue_depth=depth.waiting,
        requeue=lambda batch, requests: send_requests(
            celery,
            config,
            batch["id"],
            batch["endpoint"],
            requests,
            config.time_limit(batch["metadata"]),
            store.backlog(batch.get("owner") or "anonymous"),
        ),
    )
    if config.sweep_interval_s > 0:
        sweeper.start(config.sweep_interval_s, state.draining)
    app.extensions[BATCH_EXTENSION] = BatchAPI(config, store, celery, sweeper)
    app.register_blueprint(batches)
    return store
