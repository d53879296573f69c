"""The Celery side of the Batch API: where the queue and the store are (``BatchConfig``), the
Celery app both sides build from it (``make_celery``: at-least-once delivery, one request a
worker process at a time) and the one way requests are queued (``send_requests``). Nothing is
built on import: the API replica builds its producer in
``lmref.production.batch_api.register_batch_api``, a worker its app in
``lmref.production.worker.create_worker_app`` (``lmref.production.celery_worker``, the entry).

Celery keeps no results of its own (no result backend): the batch store holds every result, so
Redis is touched only by lmref's code, where each call is bounded and an unavailable store is
waited out (a result backend would be a second, unguarded path to the same Redis).

Usage::

    from lmref.production.celery_app import BatchConfig, make_celery

    config = BatchConfig.from_env()        # LMREF_BROKER_URL, LMREF_STORE_URL, ...
    celery = make_celery(config)           # send_requests(celery, config, ...) or a worker's app
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from celery import Celery

from lmref.core.credentials import service_url
from lmref.production.connections import amqp_publish_options
from lmref.production.fair_queue import batch_queue, priorities
from lmref.production.store import TTL_S

TASK_NAME = "lmref.batch.run_request"  # the one task: kept as it was, queued messages name it


@dataclass
class BatchConfig:
    """Where the queue and the store are, and the server-side limits of one request (a client
    may lower the time limit through a batch's metadata, never raise it)."""

    # No credentials here: they come from the environment or a mounted file (``from_env``).
    broker_url: str = "amqp://127.0.0.1:5672//"
    store_url: str = "redis://127.0.0.1:6379/0"  # files, batches, results (a Redis of its own)
    queue: str = "lmref-batch"
    job_time_limit_s: float = 300.0  # soft: the request ends with a 504 line; hard: +15 s, killed
    max_attempts: int = 3  # deliveries of one request before it fails as a poison pill
    max_requests: int = 50_000  # lines in one batch file (OpenAI's limit)
    ttl_s: int = TTL_S  # files, batches and results expire this long after their last write
    store_retry_after_s: int = 5  # Retry-After of a 503 when the store or the broker is down
    sweep_interval_s: float = 30.0  # how often a replica reconciles live batches (0: never)
    max_requeues: int = 2  # times the sweeper queues a batch's lost requests again, then fails them

    @property
    def stall_s(self) -> float:
        """A batch with no worker activity for this long, while the queue is empty, has lost
        requests: the longest a request may run (its hard time limit) plus a minute."""
        return self.job_time_limit_s + 15 + 60

    @classmethod
    def from_env(cls) -> BatchConfig:
        """``LMREF_BROKER_URL``, ``LMREF_STORE_URL``, ``LMREF_BATCH_QUEUE``,
        ``LMREF_JOB_TIME_LIMIT_S``, ``LMREF_MAX_ATTEMPTS``, ``LMREF_SWEEP_INTERVAL_S`` over the
        defaults. Each URL may come from a file (``LMREF_BROKER_URL_FILE``) and take its user
        and password from others (``LMREF_BROKER_PASSWORD_FILE``...): a mounted Secret
        (``lmref.core.credentials.service_url``)."""
        env, default = os.environ, cls()
        return cls(
            broker_url=service_url("LMREF_BROKER", env) or default.broker_url,
            store_url=service_url("LMREF_STORE", env) or default.store_url,
            queue=env.get("LMREF_BATCH_QUEUE", default.queue),
            job_time_limit_s=float(env.get("LMREF_JOB_TIME_LIMIT_S", default.job_time_limit_s)),
            max_attempts=int(env.get("LMREF_MAX_ATTEMPTS", default.max_attempts)),
            sweep_interval_s=float(env.get("LMREF_SWEEP_INTERVAL_S", default.sweep_interval_s)),
        )

    def time_limit(self, metadata: dict | None) -> float:
        """A batch's time limit per request: its metadata's ``job_time_limit_s`` when that is
        lower than the server's, else the server's (checked on create by
        ``lmref.production.batch_input.check_metadata``)."""
        asked = (metadata or {}).get("job_time_limit_s")
        try:
            return min(float(asked), self.job_time_limit_s) if asked else self.job_time_limit_s
        except ValueError:
            return self.job_time_limit_s


def make_celery(config: BatchConfig, main: str = "lmref.production", producer: bool = False):
    """The Celery app both sides use: at-least-once delivery, one request a worker at a time.
    ``producer``: the replica's app, whose publishes are bounded (``amqp_publish_options``)."""
    app = Celery(main, broker=config.broker_url)  # no result backend: see the module's docstring
    app.conf.update(
        task_acks_late=True,  # ack after the task ran, not when it was received
        task_reject_on_worker_lost=True,  # a pool process that died: requeue, do not ack
        task_acks_on_failure_or_timeout=True,  # a request that failed on its input is done
        worker_prefetch_multiplier=1,  # hold one unacked message per process, no more
        task_default_queue=config.queue,
        task_queues=[batch_queue(config.queue)],  # with priorities: lmref.production.fair_queue
        task_soft_time_limit=config.job_time_limit_s,
        task_time_limit=config.job_time_limit_s + 15,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_proc_alive_timeout=600,  # the pool process loads the model before it is up
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    if producer:
        app.conf.update(amqp_publish_options())
    return app


def send_requests(
    celery: Celery,
    config: BatchConfig,
    batch_id: str,
    endpoint: str,
    requests: list[dict],
    time_limit: float,
    backlog: int = 0,
) -> None:
    """Queue one message per request (``custom_id`` and ``body`` each) over one connection,
    each with its priority from its tenant's ``backlog`` (requests it has waiting already:
    ``lmref.production.fair_queue``). Raises ``kombu.exceptions.OperationalError`` when the
    broker is unavailable; some messages may have gone out by then (a worker runs them; their
    batch says whether to keep the result)."""
    with celery.producer_or_acquire() as producer:
        for r, priority in zip(requests, priorities(backlog, len(requests))):
            celery.send_task(
                TASK_NAME,
                args=[batch_id, r["custom_id"], endpoint, r["body"]],
                queue=config.queue,
                producer=producer,
                soft_time_limit=time_limit,
                time_limit=time_limit + 15,
                priority=priority,
            )
