"""The Celery worker's entry point: ``celery -A lmref.production.celery_worker worker``.

This module IS the entry, so it is the one module of the package that builds something on
import: the worker's Celery app, from the environment (``LMREF_BROKER_URL``, ``LMREF_STORE_URL``,
``LMREF_WORKER_MODELS`` ...: ``lmref.production.worker``; ``LMREF_METRICS_PORT``: its Prometheus
metrics, ``lmref.production.worker_metrics``). Nothing else imports it; a server
replica builds its own producer app in ``lmref.production.batch_api.register_batch_api``.

Usage::

    celery -A lmref.production.celery_worker worker --pool prefork --concurrency 1
"""

from __future__ import annotations

from lmref.production import worker_metrics

# Before anything imports prometheus_client: with LMREF_METRICS_PORT, its multiprocess mode
# (the pool's processes count into files the main process adds up and serves).
worker_metrics.prepare()

from lmref.production.celery_app import BatchConfig  # noqa: E402
from lmref.production.worker import READY_LINE, create_worker_app  # noqa: E402

__all__ = ["READY_LINE", "app"]
app = create_worker_app(BatchConfig.from_env())
