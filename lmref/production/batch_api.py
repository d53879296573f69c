"""The OpenAI Batch API in a server replica: files and batches over the Redis store, one Celery
message per request for the workers (``lmref.production.worker``).

``register_batch_api(app, BatchConfig(...))`` adds ``POST /v1/files`` (upload a JSONL of
requests), ``GET /v1/files/{id}[/content]``, ``POST /v1/batches``, ``GET /v1/batches/{id}`` and
``GET /v1/batches`` to a server app (behind its API keys), so the official ``openai`` client's
``files.create`` / ``batches.create`` / ``batches.retrieve`` / ``files.content`` work unchanged,
and exports the queue depth (``lmref:batch_queue_depth``, messages waiting in RabbitMQ) on
``/metrics`` for an autoscaler. The replica's producer Celery app is built there, once. An
upload is bounded by the server's ``--max-content-length`` (1 MiB by default: raise it for large
batch files). ``python -m lmref.serve --broker-url ... --store-url ...`` does this.

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

import json
import logging
import time
import uuid
from dataclasses import dataclass

from celery import Celery
from flask import Blueprint, Flask, current_app, request
from prometheus_client.core import GaugeMetricFamily

from lmref.production.celery_app import TASK_NAME, BatchConfig, make_celery
from lmref.production.store import Store
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


def batch_api() -> BatchAPI:
    """The Batch API of the app handling the current request."""
    return current_app.extensions[BATCH_EXTENSION]


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_request")


def _parse_requests(content: bytes, endpoint: str, file_id: str, limit: int) -> list[dict]:
    """The input file's requests; a bad line is a 400 naming the line and the field."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{file_id} is not UTF-8 text", "input_file_id") from None
    requests, seen = [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{file_id} line {number}"
        try:
            item = json.loads(raw)
        except ValueError:
            raise _bad(f"{where} is not valid JSON", "input_file_id") from None
        if not isinstance(item, dict):
            raise _bad(f"{where} must be a JSON object", "input_file_id")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise _bad(f"{where}: 'custom_id' must be a non-empty string", "input_file_id")
        if custom_id in seen:
            raise _bad(f"{where}: 'custom_id' {custom_id!r} is used twice", "input_file_id")
        seen.add(custom_id)
        if item.get("method", "POST") != "POST":
            raise _bad(f"{where}: 'method' must be POST", "input_file_id")
        if item.get("url") != endpoint:
            raise _bad(
                f"{where}: 'url' is {item.get('url')!r}, but the batch's endpoint is {endpoint!r}",
                "input_file_id",
            )
        if not isinstance(item.get("body"), dict):
            raise _bad(f"{where}: 'body' must be a JSON object", "input_file_id")
        if item["body"].get("stream"):
            raise _bad(f"{where}: 'stream' is not allowed in a batch", "input_file_id")
        requests.append(item)
    if not requests:
        raise _bad(f"{file_id} holds no requests", "input_file_id")
    if len(requests) > limit:
        raise _bad(f"{file_id} holds {len(requests)} requests; at most {limit}", "input_file_id")
    return requests


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
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                _, messages, listeners = conn.default_channel.queue_declare(
                    self.queue, passive=True
                )
            depth.add_metric([self.queue], messages)
            consumers.add_metric([self.queue], listeners)
        except Exception as exc:  # no queue yet, broker down: the scrape still succeeds
            log.debug("queue depth unavailable: %s", exc)
        yield depth
        yield consumers


def _not_found(kind: str, ident: str) -> APIError:
    """OpenAI's 404 for a batch or a file id that is not in the store."""
    return APIError(
        404,
        f"No {kind} with id '{ident}'",
        "not_found_error",
        param=f"{kind}_id",
        code=f"{kind}_not_found",
    )


def batch_or_404(batch_id: str) -> dict:
    batch = batch_api().store.finalize(batch_id)
    if batch is None:
        raise _not_found("batch", batch_id)
    return batch


def file_or_404(file_id: str) -> dict:
    meta = batch_api().store.file(file_id)
    if meta is None:
        raise _not_found("file", file_id)
    return meta


@batches.post("/v1/files")
def upload():
    upload = request.files.get("file")
    if upload is None:
        raise _bad("a multipart form field 'file' is required", "file")
    purpose = request.form.get("purpose")
    if purpose != "batch":
        raise _bad(f"'purpose' must be 'batch' (got {purpose!r})", "purpose")
    return batch_api().store.put_file(upload.read(), upload.filename or "upload.jsonl", purpose)


@batches.get("/v1/files/<file_id>")
def file_meta(file_id: str):
    return file_or_404(file_id)


@batches.get("/v1/files/<file_id>/content")
def file_content(file_id: str):
    file_or_404(file_id)
    content = batch_api().store.file_content(file_id) or b""
    return content, 200, {"Content-Type": "application/jsonl"}


def _time_limit(metadata: dict | None, default: float) -> float:
    """metadata ``job_time_limit_s`` (OpenAI's metadata values are strings): each request's
    time limit; a 400 unless it is seconds in (0, 24 h]."""
    limit = (metadata or {}).get("job_time_limit_s", default)
    try:
        limit = float(limit)
    except (TypeError, ValueError):
        limit = -1.0
    if not 0 < limit <= 24 * 3600:
        raise _bad("metadata 'job_time_limit_s' must be seconds, > 0", "metadata")
    return limit


def new_batch(endpoint: str, file_id: str, total: int, metadata: dict | None) -> dict:
    """A batch object as OpenAI writes one, in progress from now."""
    now = int(time.time())
    return {
        "id": "batch_" + uuid.uuid4().hex,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": file_id,
        "completion_window": "24h",
        "status": "in_progress",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": now,
        "expires_at": now + 24 * 3600,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "metadata": metadata,
    }


@batches.post("/v1/batches")
def create_batch():
    api = batch_api()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise _bad(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", "endpoint")
    if body.get("completion_window") != "24h":
        raise _bad("'completion_window' must be '24h'", "completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _bad("'metadata' must be an object", "metadata")
    limit = _time_limit(metadata, api.config.job_time_limit_s)
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise _bad("'input_file_id' must be a file id", "input_file_id")
    file_or_404(file_id)
    requests = _parse_requests(
        api.store.file_content(file_id) or b"", endpoint, file_id, api.config.max_requests
    )
    batch = new_batch(endpoint, file_id, len(requests), metadata)
    api.store.put_batch(batch, [r["custom_id"] for r in requests])
    with api.celery.producer_or_acquire() as producer:  # one connection for every message
        for r in requests:
            api.celery.send_task(
                TASK_NAME,
                args=[batch["id"], r["custom_id"], endpoint, r["body"]],
                queue=api.config.queue,
                producer=producer,
                soft_time_limit=limit,
                time_limit=limit + 15,
            )
    return batch


@batches.get("/v1/batches/<batch_id>")
def retrieve_batch(batch_id: str):
    return batch_or_404(batch_id)


@batches.get("/v1/batches")
def list_batches():
    limit = request.args.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise _bad("'limit' must be an integer from 1 to 100", "limit")
    store = batch_api().store
    found = [b for b in (store.batch(i) for i in store.batch_ids()) if b]
    found.sort(key=lambda b: b["created_at"], reverse=True)
    page = found[: int(limit)]
    return {
        "object": "list",
        "data": page,
        "has_more": len(found) > len(page),
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


def register_batch_api(app: Flask, config: BatchConfig) -> Store:
    """Add the Files and Batches routes to a server app (``lmref.serving.app.create_app``), behind
    its API keys, and the queue depth gauge to its ``/metrics``. Builds this replica's producer
    Celery app (the one it has)."""
    store = Store(config.store_url, config.ttl_s)
    celery = make_celery(config)
    app.extensions[EXTENSION].metrics.registry.register(QueueDepthCollector(celery, config.queue))
    app.extensions[BATCH_EXTENSION] = BatchAPI(config, store, celery)
    app.register_blueprint(batches)
    return store
