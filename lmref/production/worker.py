"""The Batch API's Celery worker: one request of a batch at a time, its result line stored once.

``create_worker_app(config)`` builds the worker's Celery app and registers the one task on it;
``celery -A lmref.production.celery_worker worker --pool prefork --concurrency 1`` is the entry
(env ``LMREF_BROKER_URL``, ``LMREF_STORE_URL``, ``LMREF_WORKER_MODELS=name=path[,name=path]``,
each folder verified against its manifest unless ``LMREF_ALLOW_UNMANIFESTED=1``, or
``LMREF_WORKER_UPSTREAM=http://vllm:8000``: forward each request to another OpenAI-compatible
server, vLLM, TGI, SGLang, with ``LMREF_WORKER_UPSTREAM_KEY``, instead of owning a model).

Each worker process owns its models (a ``lmref.serving.state.ServingState``, loaded when the
pool process starts) and answers a request with ``lmref.serving.service.answer``: the very
request shaping, engine and response shaping the HTTP server runs, without HTTP. A request is
acknowledged only when its line is stored (``acks_late``, ``task_reject_on_worker_lost``,
prefetch 1), so a worker killed mid-request loses nothing: RabbitMQ delivers it again. A store
that is down, frozen or full is waited out with the message unacknowledged (``patiently``), the
answer kept in memory; past the time limit the message goes back to the queue. A request
that fails on its own input (a 4xx, its time limit, a worker lost ``max_attempts`` times on it)
fails alone. With env ``LMREF_CACHE_URL`` workers share the replicas' response cache, each
request keyed by its batch's owner (env ``LMREF_SHARED_RESPONSE_CACHE=1``: across tenants, as
``--shared-response-cache`` on the replicas). A batch ``cancelling`` or ``cancelled``: its
queued requests are skipped.

Usage::

    from lmref.production.celery_app import BatchConfig
    from lmref.production.worker import create_worker_app

    celery = create_worker_app(BatchConfig.from_env())    # what lmref.production.celery_worker does
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery, Task, signals
from celery.exceptions import Reject, SoftTimeLimitExceeded

from lmref.core.allocator import keep_freed_memory
from lmref.core.credentials import service_url
from lmref.production.celery_app import TASK_NAME, BatchConfig, make_celery
from lmref.production.connections import STORE_ERRORS
from lmref.production.store import Store, failure_line, result_line
from lmref.production.worker_metrics import WorkerMetrics
from lmref.serving.config import ServingConfig
from lmref.serving.engine import ModelSpec
from lmref.serving.schema import APIError
from lmref.serving.service import answer
from lmref.serving.state import ServingState

log = logging.getLogger("lmref.production.worker")
READY_LINE = "lmref worker: models loaded"
T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """The store stayed unavailable for longer than a caller would wait."""


def env_flag(env: dict[str, str], name: str) -> bool:
    """Whether env ``name`` says yes (1, true, yes)."""
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def worker_models(text: str, allow_unmanifested: bool = False) -> list[ModelSpec]:
    """``name=path[,name=path]`` (env ``LMREF_WORKER_MODELS``) as model specs; each folder is
    verified against its manifest before it loads, unless ``allow_unmanifested`` (env
    ``LMREF_ALLOW_UNMANIFESTED=1``, as the server's ``--allow-unmanifested``)."""
    specs = []
    for item in filter(None, text.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"LMREF_WORKER_MODELS takes name=path[,name=path], got {item!r}")
        specs.append(
            ModelSpec(name, path, batch_wait_ms=0.0, allow_unmanifested=allow_unmanifested)
        )
    if not specs:
        raise ValueError("LMREF_WORKER_MODELS is empty: a worker needs a model (name=path)")
    return specs


def forward(
    upstream: str,
    path: str,
    body: dict,
    api_key: str | None = None,
    timeout: float = 600.0,
    request_id: str = "",
) -> tuple[int, Any]:
    """POST one request to another OpenAI-compatible server; its status and JSON body (an HTTP
    error is an answer too: it goes to the error file). Connection errors raise ``URLError``.
    ``request_id``: sent as ``X-Request-ID``, so the upstream's logs name it too."""
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["X-Request-ID"] = request_id
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


class BatchWorker:
    """One worker process's state: its config, its store and (unless it forwards upstream) the
    serving state that owns its models, each made on first use."""

    def __init__(self, config: BatchConfig, env: dict[str, str] | None = None):
        self.config = config
        self.env = dict(os.environ if env is None else env)
        self.upstream = self.env.get("LMREF_WORKER_UPSTREAM") or None
        self._store: Store | None = None
        self._serving: ServingState | None = None
        self.metrics: WorkerMetrics | None = None  # create_worker_app sets it

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.config.store_url, self.config.ttl_s)
        return self._store

    @property
    def serving(self) -> ServingState:
        """The models, loaded once; a model that fails to load fails the worker."""
        if self._serving is None:
            models = worker_models(
                self.env.get("LMREF_WORKER_MODELS", ""),
                env_flag(self.env, "LMREF_ALLOW_UNMANIFESTED"),
            )
            cache = None
            cache_url = service_url("LMREF_CACHE", self.env)  # or from files: a Secret's
            if cache_url:
                from lmref.production.shared_cache import RedisResponseCache

                cache = RedisResponseCache(cache_url, versions={m.name: m.path for m in models})
            # The replicas' setting: a cache shared across tenants only when they say so too.
            shared = env_flag(self.env, "LMREF_SHARED_RESPONSE_CACHE")
            config = ServingConfig(models=models, api_keys=[], shared_response_cache=shared)
            state = ServingState(config, cache)
            state.start(wait=True)
            if state.load_errors():
                raise RuntimeError(f"worker could not load its models: {state.load_errors()}")
            self._serving = state
        return self._serving

    def load(self, **_: Any) -> None:
        """``worker_process_init``: the model loads before the first request comes."""
        started = time.perf_counter()
        if not self.upstream:  # this process runs the engine, as a replica does
            keep_freed_memory()  # before the engine's threads start: lmref.core.allocator says why
            self.serving  # noqa: B018 (loads the models)
        # Celery says "ready." before its pool processes finish this handler: this line (on
        # stdout, which Celery logs) is the moment the worker can really serve.
        print(f"{READY_LINE} in {time.perf_counter() - started:.1f} s", flush=True)

    def respond(
        self, url: str, body: dict, limit: float, tenant: str | None = None, request_id: str = ""
    ) -> tuple[int, Any]:
        """This worker's answer to one request: the server's status and body; ``tenant``: the
        batch's owner, whose cached answers alone it may reuse."""
        if self.upstream:
            key = self.env.get("LMREF_WORKER_UPSTREAM_KEY")
            return forward(self.upstream, url, body, key, limit + 15, request_id)
        try:
            return answer(self.serving, url, body, tenant, request_id)
        except SoftTimeLimitExceeded:  # the request ends here; its rows are cancelled
            err = APIError(
                504,
                f"the request ran past its time limit of {limit:g} s",
                "server_error",
                code="time_limit_exceeded",
            )
        except Exception:  # as the HTTP server answers an unexpected error
            log.exception("request %s failed", request_id)
            err = APIError(500, "internal server error", "server_error", code="internal_error")
        return err.status, err.body()

    def patiently(self, call: Callable[..., T], *args: Any, give_up_after_s: float = 0) -> T:
        """``call(*args)`` against the store, waited out while the store is unavailable (down,
        frozen, out of memory): this worker can do nothing useful without it, and its message
        stays unacknowledged meanwhile. The wait ends when the call succeeds, when the task's
        soft time limit strikes (``SoftTimeLimitExceeded``), or after ``give_up_after_s`` (0:
        no bound of its own), with ``StoreUnavailable``. Every store call is idempotent, so
        one that timed out after Redis ran it is safe to repeat."""
        started, pause = time.monotonic(), 0.25
        while True:
            try:
                return call(*args)
            except STORE_ERRORS as exc:
                waited = time.monotonic() - started
                if give_up_after_s and waited > give_up_after_s:
                    raise StoreUnavailable(f"store unavailable for {waited:.0f} s: {exc}") from exc
                if pause == 0.25:  # once per outage, not once per try
                    log.warning("store unavailable (%s); waiting for it", exc)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def run(self, task: Task, batch_id: str, custom_id: str, url: str, body: dict) -> int:
        """One delivery of one request: skip it when already answered or its batch is gone or
        failed, fail it when delivered too often, else answer it and store its line; returns
        the status. A store that stays unavailable past the soft time limit: the message goes
        back to the queue unacknowledged (``Reject(requeue=True)``), never lost."""
        try:
            return self._run(task, batch_id, custom_id, url, body)
        except SoftTimeLimitExceeded:  # it struck while waiting for the store: nothing recorded
            raise Reject("the store stayed unavailable past the time limit", requeue=True) from None

    def _run(self, task: Task, batch_id: str, custom_id: str, url: str, body: dict) -> int:
        store, config = self.store, self.config
        if self.patiently(store.has_result, batch_id, custom_id):  # done before, ack was lost
            self.patiently(store.finalize, batch_id)
            return 0
        batch = self.patiently(store.batch, batch_id)
        if batch is None or batch["status"] in ("failed", "cancelling", "cancelled", "expired"):
            return 0  # its batch failed to queue, was cancelled or expired: skipped
        attempts = self.patiently(store.attempt, batch_id, custom_id, f"{task.request.hostname}")
        # Read again now that this request shows as running: a cancel that came between the
        # read above and the attempt saw nothing running and may have ended the batch; either
        # this read sees its ``cancelling`` or the cancel sees this request and waits for it.
        batch = self.patiently(store.batch, batch_id) or batch
        if batch["status"] in ("cancelling", "cancelled"):
            self.patiently(store.release, batch_id, custom_id)
            self.patiently(store.finalize, batch_id)
            return 0
        # This request's id (its line's response.request_id), and the batch's creator's: an
        # operator follows a client's X-Request-ID to each line, and each line to this log.
        rid, origin = f"req_{task.request.id}", batch.get("request_id")
        limit = (task.request.timelimit or (None, None))[1] or config.job_time_limit_s
        if attempts > config.max_attempts:
            # Every delivery so far ended without a result (its worker died on it, or its
            # upstream was unreachable): a poison pill, failed alone instead of forever.
            message = (
                f"delivered {attempts} times, {attempts - 1} without a result (workers lost while "
                f"running it, or its upstream unreachable); at most {config.max_attempts} allowed"
            )
            line = failure_line(custom_id, "max_attempts_exceeded", message, rid)
            log.warning(
                "%s %s %s (batch created by %s): %s", batch_id, custom_id, rid, origin, message
            )
            self.patiently(store.record, batch_id, custom_id, line)
            self.patiently(store.finalize, batch_id)
            self.count(500, "max_attempts_exceeded")
            return 500
        try:
            status, response = self.respond(url, body, limit, batch.get("owner"), rid)
        except urllib.error.URLError as exc:  # the upstream is down: not the request's fault
            raise task.retry(exc=exc, countdown=2, max_retries=5) from None
        line = result_line(custom_id, status, response, rid)
        log.info(
            "%s %s %s (batch created by %s): status %d", batch_id, custom_id, rid, origin, status
        )
        # The answer is kept in memory while the store is waited out: the request is not run
        # again when Redis comes back within the time limit.
        self.patiently(store.record, batch_id, custom_id, line)
        self.patiently(store.finalize, batch_id)
        self.count(status)
        return status

    def count(self, status: int, failure: str = "") -> None:
        """A line stored (``lmref:worker_lines``), and a failure's code when it is one."""
        if self.metrics is not None:
            self.metrics.lines.labels(status=str(status)).inc()
            if failure:
                self.metrics.failures.labels(code=failure).inc()

    def fail(
        self, batch_id: str, custom_id: str, exc: BaseException, request_id: str | None = None
    ) -> None:
        """A task that raised, or hit its hard time limit: the request fails alone, on record.
        Runs in the worker's main process for a hard time limit, so the store is waited for a
        bounded time only; a line that could not be written is the sweeper's to find."""
        code = "time_limit_exceeded" if "TimeLimit" in type(exc).__name__ else "worker_error"
        line = failure_line(custom_id, code, f"{type(exc).__name__}: {exc}", request_id)
        log.error("%s %s %s failed: %s", batch_id, custom_id, request_id, code)
        if self.metrics is not None:  # counted when it happened, stored or not
            self.metrics.failures.labels(code=code).inc()
        try:
            self.patiently(self.store.record, batch_id, custom_id, line, give_up_after_s=30)
            self.patiently(self.store.finalize, batch_id, give_up_after_s=30)
        except StoreUnavailable:
            log.error(
                "could not record the failure of %s/%s; the sweeper will", batch_id, custom_id
            )


class RequestTask(Task):
    """The task's class: ``worker`` (a ``BatchWorker``) is set by ``create_worker_app``."""

    worker: BatchWorker

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # Runs for exceptions and for the hard time limit (in the parent process, the pool
        # process having been killed).
        self.worker.fail(args[0], args[1], exc, f"req_{task_id}")


def run_request(task: Task, batch_id: str, custom_id: str, url: str, body: dict) -> int:
    """Run one request of a batch (or forward it to ``LMREF_WORKER_UPSTREAM``); store its
    line; returns the status."""
    return task.worker.run(task, batch_id, custom_id, url, body)


def create_worker_app(config: BatchConfig, env: dict[str, str] | None = None) -> Celery:
    """A worker's Celery app: the task registered, the models loaded in each pool process as it
        starts (``worker_process_init``); with env ``LMREF_METRICS_PORT`` its metrics on that port
    (``lmref.production.worker_metrics``). ``env``: the worker's settings (default ``os.environ``)."""
    app = make_celery(config, main="lmref.production.worker")
    worker = BatchWorker(config, env)
    worker.metrics = WorkerMetrics()
    # Options of the task decorator become attributes of the task class: task.worker.
    app.task(name=TASK_NAME, base=RequestTask, bind=True, worker=worker)(run_request)
    signals.worker_process_init.connect(worker.load, weak=False)
    # In the main process, before the pool forks: one endpoint adding up every pool process.
    signals.worker_init.connect(lambda **_: worker.metrics.serve(worker.env), weak=False)
    return app
