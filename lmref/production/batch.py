"""Asynchronous inference: the OpenAI Batch API on Celery workers (RabbitMQ broker, Redis store).

Two sides of one queue:

- **The API** (in every server replica): ``register_batch_api(app, BatchConfig(...))`` adds
  ``POST /v1/files`` (upload a JSONL of requests), ``GET /v1/files/{id}[/content]``,
  ``POST /v1/batches``, ``GET /v1/batches/{id}`` and ``GET /v1/batches``, so the official
  ``openai`` client's ``files.create`` / ``batches.create`` / ``batches.retrieve`` /
  ``files.content`` work unchanged, and exports the queue depth (``lmref:batch_queue_depth``,
  messages waiting in RabbitMQ) on ``/metrics`` for an autoscaler.
- **The workers**: ``celery -A lmref.production.batch worker --pool prefork --concurrency 1``, env
  ``LMREF_BROKER_URL``, ``LMREF_STORE_URL``, ``LMREF_WORKER_MODELS=name=path[,name=path]`` (or
  ``LMREF_WORKER_UPSTREAM=http://vllm:8000``: forward each request to another OpenAI-compatible
  server, vLLM, TGI, SGLang, with ``LMREF_WORKER_UPSTREAM_KEY``, instead of owning a model).
  Each worker owns the model and takes one request at a time; a request is acknowledged only
  when its result is stored (``acks_late``, ``task_reject_on_worker_lost``, prefetch 1), so a
  worker killed mid-request loses nothing: RabbitMQ delivers it again and another worker
  completes it. Results are written once per ``custom_id`` (``HSETNX``), so a redelivered
  request still appears exactly once in the output file. A request that fails on its own input
  (a 4xx, its time limit, a worker lost ``max_attempts`` times on it) fails alone: its line goes
  to the error file as OpenAI's does.

Depends on ``lmref.serving.app`` (the dependency is the point): a worker runs each request through
the very Flask app the HTTP server runs (in process, no socket), so validation, errors and
response bodies are the server's own. Files, batches and results live in Redis (shared by every
replica); Redis is also Celery's result backend. An upload is bounded by the server's
``--max-content-length`` (1 MiB by default: raise it for large batch files). With env ``LMREF_CACHE_URL`` workers share the
replicas' response cache (``lmref.production.shared_cache``).

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
import os
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from flask import Blueprint, Flask, request
from prometheus_client.core import GaugeMetricFamily

from lmref.serving.app import APIError, ModelSpec, ServingConfig, create_app

log = logging.getLogger("lmref.production.batch")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
TASK_NAME = "lmref.batch.run_request"


@dataclass
class BatchConfig:
    """Where the queue and the store are, and the limits of one request."""

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    store_url: str = "redis://127.0.0.1:6379/0"  # files, batches, results; Celery's backend too
    queue: str = "lmref-batch"
    job_time_limit_s: float = 300.0  # soft: the request ends with a 504 line; hard: +15 s, killed
    max_attempts: int = 3  # deliveries of one request before it fails as a poison pill
    max_requests: int = 50_000  # lines in one batch file (OpenAI's limit)
    ttl_s: int = 7 * 24 * 3600  # files, batches and results expire after this

    @classmethod
    def from_env(cls) -> BatchConfig:
        """``LMREF_BROKER_URL``, ``LMREF_STORE_URL``, ``LMREF_BATCH_QUEUE``,
        ``LMREF_JOB_TIME_LIMIT_S``, ``LMREF_MAX_ATTEMPTS`` over the defaults."""
        env, default = os.environ, cls()
        return cls(
            broker_url=env.get("LMREF_BROKER_URL", default.broker_url),
            store_url=env.get("LMREF_STORE_URL", default.store_url),
            queue=env.get("LMREF_BATCH_QUEUE", default.queue),
            job_time_limit_s=float(env.get("LMREF_JOB_TIME_LIMIT_S", default.job_time_limit_s)),
            max_attempts=int(env.get("LMREF_MAX_ATTEMPTS", default.max_attempts)),
        )


def make_celery(config: BatchConfig) -> Celery:
    """The Celery app both sides use: at-least-once delivery, one request a worker at a time."""
    app = Celery("lmref.production.batch", broker=config.broker_url, backend=config.store_url)
    app.conf.update(
        task_acks_late=True,  # ack after the task ran, not when it was received
        task_reject_on_worker_lost=True,  # a pool process that died: requeue, do not ack
        task_acks_on_failure_or_timeout=True,  # a request that failed on its input is done
        worker_prefetch_multiplier=1,  # hold one unacked message per process, no more
        task_default_queue=config.queue,
        task_soft_time_limit=config.job_time_limit_s,
        task_time_limit=config.job_time_limit_s + 15,
        task_track_started=True,
        result_expires=config.ttl_s,
        broker_connection_retry_on_startup=True,
        worker_proc_alive_timeout=600,  # the pool process loads the model before it is up
        worker_hijack_root_logger=False,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )
    return app


# ----------------------------------------------------------------------------------- the store
class Store:
    """Files, batches and per-request results in Redis (keys ``lmref:batch:*``)."""

    def __init__(self, url: str, ttl_s: int = BatchConfig.ttl_s):
        self.r = redis.Redis.from_url(url)
        self.ttl_s = ttl_s

    def _key(self, *parts: str) -> str:
        return "lmref:batch:" + ":".join(parts)

    def put_file(self, content: bytes, filename: str, purpose: str, file_id: str = "") -> dict:
        file_id = file_id or "file-" + uuid.uuid4().hex
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": int(time.time()) + self.ttl_s,
        }
        pipe = self.r.pipeline()
        pipe.set(self._key("file", file_id), json.dumps(meta), ex=self.ttl_s)
        pipe.set(self._key("file", file_id, "content"), content, ex=self.ttl_s)
        pipe.execute()
        return meta

    def file(self, file_id: str) -> dict | None:
        raw = self.r.get(self._key("file", file_id))
        return json.loads(raw) if raw else None

    def file_content(self, file_id: str) -> bytes | None:
        return self.r.get(self._key("file", file_id, "content"))

    def put_batch(self, batch: dict, custom_ids: list[str]) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._key(batch["id"]), json.dumps(batch), ex=self.ttl_s)
        pipe.rpush(self._key(batch["id"], "order"), *custom_ids)
        pipe.expire(self._key(batch["id"], "order"), self.ttl_s)
        pipe.execute()

    def batch(self, batch_id: str) -> dict | None:
        raw = self.r.get(self._key(batch_id))
        return json.loads(raw) if raw else None

    def update_batch(self, batch_id: str, **fields: Any) -> None:
        batch = self.batch(batch_id) or {}
        self.r.set(self._key(batch_id), json.dumps({**batch, **fields}), ex=self.ttl_s)

    def batch_ids(self) -> list[str]:
        return sorted(
            (
                k.decode().rsplit(":", 1)[1]
                for k in self.r.scan_iter(self._key("batch_*"))
                if k.count(b":") == 2
            ),
            reverse=True,
        )

    # The result and its count in one step (a Lua script runs atomically in Redis): a worker that
    # dies in between cannot leave a result uncounted, and a batch that never completes.
    _RECORD = """
    if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
    redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
    redis.call('EXPIRE', KEYS[1], ARGV[4]); redis.call('EXPIRE', KEYS[2], ARGV[4])
    return 1"""

    def record(self, batch_id: str, custom_id: str, line: dict) -> bool:
        """Store one request's result line; False when it was stored already (a redelivery)."""
        outcome = "completed" if line["error"] is None else "failed"
        keys = [self._key(batch_id, "results"), self._key(batch_id, "counts")]
        return bool(
            self.r.eval(self._RECORD, 2, *keys, custom_id, json.dumps(line), outcome, self.ttl_s)
        )

    def has_result(self, batch_id: str, custom_id: str) -> bool:
        return bool(self.r.hexists(self._key(batch_id, "results"), custom_id))

    def attempt(self, batch_id: str, custom_id: str, worker: str) -> int:
        """Count one delivery of a request to a worker; returns how many there were."""
        pipe = self.r.pipeline()
        pipe.hincrby(self._key(batch_id, "attempts"), custom_id, 1)
        pipe.hset(self._key(batch_id, "workers"), custom_id, worker)
        pipe.expire(self._key(batch_id, "attempts"), self.ttl_s)
        pipe.expire(self._key(batch_id, "workers"), self.ttl_s)
        return int(pipe.execute()[0])

    def attempts(self, batch_id: str) -> dict[str, int]:
        return {
            k.decode(): int(v) for k, v in self.r.hgetall(self._key(batch_id, "attempts")).items()
        }

    def running(self, batch_id: str) -> dict[str, str]:
        """Requests a worker has taken and not finished: custom_id -> worker."""
        done = set(k.decode() for k in self.r.hkeys(self._key(batch_id, "results")))
        return {c: w for c, w in self.workers(batch_id).items() if c not in done}

    def workers(self, batch_id: str) -> dict[str, str]:
        """Which worker took each request last (a redelivered one: the one that finished it)."""
        return {
            k.decode(): v.decode()
            for k, v in self.r.hgetall(self._key(batch_id, "workers")).items()
        }

    def finalize(self, batch_id: str) -> dict | None:
        """When every request has a result: write the output and error files (input order) and
        mark the batch completed. Idempotent; any replica or worker may call it."""
        batch = self.batch(batch_id)
        if batch is None or batch["status"] in ("completed", "failed", "cancelled"):
            return batch
        done = {
            k.decode(): int(v) for k, v in self.r.hgetall(self._key(batch_id, "counts")).items()
        }
        total = batch["request_counts"]["total"]
        counts = {
            "total": total,
            "completed": done.get("completed", 0),
            "failed": done.get("failed", 0),
        }
        batch["request_counts"] = counts
        if counts["completed"] + counts["failed"] < total:
            return batch
        # One finalizer at a time; the lock expires, so a finalizer that died is replaced.
        if not self.r.set(self._key(batch_id, "finalizing"), "1", nx=True, ex=30):
            return batch
        results = self.r.hgetall(self._key(batch_id, "results"))
        order = [c.decode() for c in self.r.lrange(self._key(batch_id, "order"), 0, -1)]
        lines = [json.loads(results[c.encode()]) for c in order]
        ok = [line for line in lines if line["error"] is None]
        bad = [line for line in lines if line["error"] is not None]

        def jsonl(items: list[dict]) -> bytes:
            return "".join(json.dumps(x) + "\n" for x in items).encode()

        output = (
            self.put_file(
                jsonl(ok), f"{batch_id}_output.jsonl", "batch_output", f"file-{batch_id}-output"
            )
            if ok
            else None
        )
        errors = (
            self.put_file(
                jsonl(bad), f"{batch_id}_error.jsonl", "batch_output", f"file-{batch_id}-errors"
            )
            if bad
            else None
        )
        now = int(time.time())
        self.update_batch(
            batch_id,
            status="completed",
            request_counts=counts,
            output_file_id=output and output["id"],
            error_file_id=errors and errors["id"],
            finalizing_at=now,
            completed_at=now,
        )
        return self.batch(batch_id)


def result_line(custom_id: str, status: int, body: Any, request_id: str) -> dict:
    """One line of the output (2xx) or error file, in OpenAI's batch output shape."""
    error = None
    if not 200 <= status < 300:
        detail = body.get("error", {}) if isinstance(body, dict) else {}
        error = {
            "code": detail.get("code") or str(status),
            "message": detail.get("message") or f"HTTP {status}",
        }
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": error,
    }


def failure_line(custom_id: str, code: str, message: str) -> dict:
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


# ----------------------------------------------------------------------------------- the worker
CONFIG = BatchConfig.from_env()
celery_app = make_celery(CONFIG)
_worker: dict[str, Any] = {}  # this process's Flask app (owning the model) and store


def _worker_models() -> list[ModelSpec]:
    text = os.environ.get("LMREF_WORKER_MODELS", "")
    specs = []
    for item in filter(None, text.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"LMREF_WORKER_MODELS takes name=path[,name=path], got {item!r}")
        specs.append(ModelSpec(name, path, batch_wait_ms=0.0))
    if not specs:
        raise ValueError("LMREF_WORKER_MODELS is empty: a worker needs a model (name=path)")
    return specs


def worker_store() -> Store:
    if "store" not in _worker:
        _worker["store"] = Store(CONFIG.store_url, CONFIG.ttl_s)
    return _worker["store"]


def forward(
    upstream: str, path: str, body: dict, api_key: str | None = None, timeout: float = 600.0
) -> tuple[int, Any]:
    """POST one request to another OpenAI-compatible server; its status and JSON body (an HTTP
    error is an answer too: it goes to the error file). Connection errors raise ``URLError``."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(
        upstream.rstrip("/") + path, json.dumps(body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"error": {"message": raw.decode("utf-8", "replace")[:500]}}


def worker_app() -> Flask:
    """This process's copy of the server app (loaded once; a worker owns its model)."""
    if "app" not in _worker:
        cache = None
        if os.environ.get("LMREF_CACHE_URL"):
            from lmref.production.shared_cache import RedisResponseCache

            models = _worker_models()
            cache = RedisResponseCache(
                os.environ["LMREF_CACHE_URL"], versions={m.name: m.path for m in models}
            )
        app = create_app(
            ServingConfig(models=_worker_models(), api_keys=[], load_in_background=False),
            cache=cache,
        )

        def time_limit(_: SoftTimeLimitExceeded):  # the request ends; its rows are cancelled
            err = APIError(
                504,
                f"the request ran past its time limit of "
                f"{_worker.get('limit', CONFIG.job_time_limit_s):g} s",
                "server_error",
                code="time_limit_exceeded",
            )
            return err.body(), err.status

        app.register_error_handler(SoftTimeLimitExceeded, time_limit)
        failed = {
            n: e.load_error for n, e in app.extensions["lmref"].engines.items() if e.load_error
        }
        if failed:
            raise RuntimeError(f"worker could not load its models: {failed}")
        _worker["app"] = app
    return _worker["app"]


READY_LINE = "lmref worker: models loaded"


@signals.worker_process_init.connect
def _load_in_pool_process(**_: Any) -> None:  # the model loads before the first request comes
    started = time.perf_counter()
    if not os.environ.get("LMREF_WORKER_UPSTREAM"):
        worker_app()
    # Celery says "ready." before its pool processes finish this handler: this line (on stdout,
    # which Celery logs) is the moment the worker can really serve.
    print(f"{READY_LINE} in {time.perf_counter() - started:.1f} s", flush=True)


class _RequestTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # Runs for exceptions and for the hard time limit (in the parent process, the pool
        # process having been killed): the request fails alone, with its error on record.
        batch_id, custom_id = args[0], args[1]
        store = worker_store()
        code = "time_limit_exceeded" if "TimeLimit" in type(exc).__name__ else "worker_error"
        store.record(
            batch_id, custom_id, failure_line(custom_id, code, f"{type(exc).__name__}: {exc}")
        )
        store.finalize(batch_id)


@celery_app.task(name=TASK_NAME, base=_RequestTask, bind=True)
def run_request(self: Task, batch_id: str, custom_id: str, url: str, body: dict) -> int:
    """Run one request of a batch through the server app (or forward it to
    ``LMREF_WORKER_UPSTREAM``); store its line; returns the status."""
    store = worker_store()
    if store.has_result(batch_id, custom_id):  # done before, the ack was lost: nothing to do
        store.finalize(batch_id)
        return 0
    attempts = store.attempt(batch_id, custom_id, f"{self.request.hostname}")
    _worker["limit"] = (self.request.timelimit or (None, None))[1] or CONFIG.job_time_limit_s
    if attempts > CONFIG.max_attempts:
        # Every delivery so far ended without a result (its worker died on it, or its upstream
        # was unreachable): a poison pill, failed alone instead of redelivered forever.
        store.record(
            batch_id,
            custom_id,
            failure_line(
                custom_id,
                "max_attempts_exceeded",
                f"delivered {attempts} times, {attempts - 1} without a result (workers lost while "
                f"running it, or its upstream unreachable); at most {CONFIG.max_attempts} allowed",
            ),
        )
        store.finalize(batch_id)
        return 500
    upstream = os.environ.get("LMREF_WORKER_UPSTREAM")
    if upstream:
        try:
            status, answer = forward(
                upstream,
                url,
                body,
                os.environ.get("LMREF_WORKER_UPSTREAM_KEY"),
                timeout=_worker["limit"] + 15,
            )
        except urllib.error.URLError as exc:  # the upstream is down: not the request's fault
            raise self.retry(exc=exc, countdown=2, max_retries=5) from None
    else:
        response = worker_app().test_client().post(url, json=body)
        status, answer = response.status_code, response.get_json(silent=True)
    store.record(
        batch_id, custom_id, result_line(custom_id, status, answer, f"req_{self.request.id}")
    )
    store.finalize(batch_id)
    return status


# ----------------------------------------------------------------------------------- the API
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


def register_batch_api(app: Flask, config: BatchConfig) -> Store:
    """Add the Files and Batches routes to a server app (``lmref.serving.app.create_app``), behind
    its API keys, and the queue depth gauge to its ``/metrics``."""
    store = Store(config.store_url, config.ttl_s)
    celery = make_celery(config)
    app.extensions["lmref"].metrics.registry.register(QueueDepthCollector(celery, config.queue))
    api = Blueprint("batch_api", __name__)

    def batch_or_404(batch_id: str) -> dict:
        batch = store.finalize(batch_id)
        if batch is None:
            raise APIError(
                404,
                f"No batch with id '{batch_id}'",
                "not_found_error",
                param="batch_id",
                code="batch_not_found",
            )
        return batch

    def file_or_404(file_id: str) -> dict:
        meta = store.file(file_id)
        if meta is None:
            raise APIError(
                404,
                f"No file with id '{file_id}'",
                "not_found_error",
                param="file_id",
                code="file_not_found",
            )
        return meta

    @api.post("/v1/files")
    def upload():
        upload = request.files.get("file")
        if upload is None:
            raise _bad("a multipart form field 'file' is required", "file")
        purpose = request.form.get("purpose")
        if purpose != "batch":
            raise _bad(f"'purpose' must be 'batch' (got {purpose!r})", "purpose")
        return store.put_file(upload.read(), upload.filename or "upload.jsonl", purpose)

    @api.get("/v1/files/<file_id>")
    def file_meta(file_id: str):
        return file_or_404(file_id)

    @api.get("/v1/files/<file_id>/content")
    def file_content(file_id: str):
        file_or_404(file_id)
        return store.file_content(file_id) or b"", 200, {"Content-Type": "application/jsonl"}

    @api.post("/v1/batches")
    def create_batch():
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
        limit = (metadata or {}).get("job_time_limit_s", config.job_time_limit_s)
        try:  # OpenAI's metadata values are strings: this one sets each request's time limit
            limit = float(limit)
        except (TypeError, ValueError):
            limit = -1.0
        if not 0 < limit <= 24 * 3600:
            raise _bad("metadata 'job_time_limit_s' must be seconds, > 0", "metadata")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise _bad("'input_file_id' must be a file id", "input_file_id")
        file_or_404(file_id)
        requests = _parse_requests(
            store.file_content(file_id) or b"", endpoint, file_id, config.max_requests
        )
        now = int(time.time())
        batch = {
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
            "request_counts": {"total": len(requests), "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        store.put_batch(batch, [r["custom_id"] for r in requests])
        with celery.producer_or_acquire() as producer:  # one connection for every message
            for r in requests:
                celery.send_task(
                    TASK_NAME,
                    args=[batch["id"], r["custom_id"], endpoint, r["body"]],
                    queue=config.queue,
                    producer=producer,
                    soft_time_limit=limit,
                    time_limit=limit + 15,
                )
        return batch

    @api.get("/v1/batches/<batch_id>")
    def retrieve_batch(batch_id: str):
        return batch_or_404(batch_id)

    @api.get("/v1/batches")
    def list_batches():
        limit = request.args.get("limit", "20")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise _bad("'limit' must be an integer from 1 to 100", "limit")
        batches = [b for b in (store.batch(i) for i in store.batch_ids()) if b]
        batches.sort(key=lambda b: b["created_at"], reverse=True)
        page = batches[: int(limit)]
        return {
            "object": "list",
            "data": page,
            "has_more": len(batches) > len(page),
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }

    app.register_blueprint(api)
    return store
