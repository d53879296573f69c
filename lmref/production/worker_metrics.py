"""Prometheus metrics of a Celery Batch worker, on a port of its own (opt-in: env
``LMREF_METRICS_PORT``; ``LMREF_METRICS_HOST``, default 0.0.0.0, the pod's address).

A prefork worker is several processes: the main one (it talks to RabbitMQ, and records a
request that hit its hard time limit) and its pool processes (they run the requests). A counter
incremented in a pool process lives in that process's memory, which the main process cannot
read; so the counters use prometheus_client's multiprocess mode (each process writes its
values to a file under ``PROMETHEUS_MULTIPROC_DIR``) and the main process serves their sum
(``MultiProcessCollector``), from a thread started at ``worker_init``, before the pool forks.
One endpoint per worker, whatever its concurrency, and it outlives a pool process replaced
after a crash (a port per pool process would not). The mode is chosen when prometheus_client
is first imported, so ``prepare(env)`` runs first, in the entry module
(``lmref.production.celery_worker``). CPU and memory are those of the whole tree (main + pool
processes), the pod's, as ``process_cpu_seconds_total`` and ``process_resident_memory_bytes``.

Usage::

    # LMREF_METRICS_PORT=9100 celery -A lmref.production.celery_worker worker ...
    # curl 127.0.0.1:9100/metrics -> lmref:worker_lines_total{status="200"} ...
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
from typing import Any

PORT_ENV, HOST_ENV, DIR_ENV = "LMREF_METRICS_PORT", "LMREF_METRICS_HOST", "PROMETHEUS_MULTIPROC_DIR"


def prepare(env: Any = os.environ) -> bool:
    """When ``LMREF_METRICS_PORT`` is set: multiprocess mode on, its folder
    (``PROMETHEUS_MULTIPROC_DIR``, default a new temporary one) emptied of a previous run's
    files; True then. Raises when prometheus_client was imported already (too late: its mode is
    fixed at import)."""
    if not env.get(PORT_ENV):
        return False
    if DIR_ENV not in env and "prometheus_client" in sys.modules:
        raise RuntimeError(
            f"{PORT_ENV} is set but prometheus_client was imported before "
            "lmref.production.worker_metrics.prepare(): its counters would not add up across "
            f"the pool's processes; set {DIR_ENV} in the worker's environment"
        )
    folder = env.get(DIR_ENV) or tempfile.mkdtemp(prefix="lmref-worker-metrics-")
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, "*.db")):  # a restarted worker starts at zero
        os.remove(stale)
    env[DIR_ENV] = folder
    return True


class WorkerMetrics:
    """The worker's counters: result lines stored by status, tasks failed by code."""

    def __init__(self) -> None:
        from prometheus_client import Counter

        self.lines = Counter(
            "lmref:worker_lines",
            "Batch result lines stored by this worker, by HTTP status",
            ["status"],
        )
        self.failures = Counter(
            "lmref:worker_task_failures",
            "Batch requests failed by the worker (an exception, a time limit, a poison pill)",
            ["code"],
        )

    def serve(self, env: Any = os.environ, **_: Any) -> None:
        """``worker_init`` (main process): the metrics endpoint, when ``LMREF_METRICS_PORT``."""
        port = env.get(PORT_ENV)
        if not port:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        if DIR_ENV in env:
            MultiProcessCollector(registry)
        registry.register(ProcessTreeCollector(os.getpid()))
        start_http_server(int(port), env.get(HOST_ENV, "0.0.0.0"), registry=registry)
        print(f"lmref worker: metrics on port {port}", flush=True)


class ProcessTreeCollector:
    """CPU seconds and resident memory of a process and all its descendants (psutil), under the
    names of prometheus_client's ProcessCollector, which reads one process only."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def collect(self):
        import psutil
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cpu = rss = 0.0
        try:
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                    cpu += times.user + times.system
                    rss += proc.memory_info().rss
                except psutil.NoSuchProcess:  # a pool process gone meanwhile
                    continue
        except psutil.NoSuchProcess:
            return
        yield CounterMetricFamily(
            "process_cpu_seconds", "CPU seconds of the worker and its pool processes", value=cpu
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory of the worker and its pool processes",
            value=rss,
        )
