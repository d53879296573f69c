"""The Celery side of the Batch API: where the queue and the store are (``BatchConfig``) and the
Celery app both sides build from it (``make_celery``): at-least-once delivery, one request a
worker process at a time. Nothing is built on import: the API replica builds its producer in
``lmref.production.batch_api.register_batch_api``, a worker its app in
``lmref.production.worker.create_worker_app`` (``lmref.production.celery_worker``, the entry).

Usage::

    from lmref.production.celery_app import BatchConfig, make_celery

    config = BatchConfig.from_env()        # LMREF_BROKER_URL, LMREF_STORE_URL, ...
    celery = make_celery(config)           # send_task(TASK_NAME, ...) or a worker's app
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from celery import Celery

from lmref.production.store import TTL_S

TASK_NAME = "lmref.batch.run_request"  # the one task: kept as it was, queued messages name it


@dataclass
class BatchConfig:
    """Where the queue and the store are, and the limits of one request."""

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    store_url: str = "redis://127.0.0.1:6379/0"  # files, batches, results; Celery's backend too
    queue: str = "lmref-batch"
    job_time_limit_s: float = 300.0  # soft: the request ends with a 504 line; hard: +15 s, killed
    max_attempts: int = 3  # deliveries of one request before it fails as a poison pill
    max_requests: int = 50_000  # lines in one batch file (OpenAI's limit)
    ttl_s: int = TTL_S  # files, batches and results expire after this

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


def make_celery(config: BatchConfig, main: str = "lmref.production") -> Celery:
    """The Celery app both sides use: at-least-once delivery, one request a worker at a time."""
    app = Celery(main, broker=config.broker_url, backend=config.store_url)
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
