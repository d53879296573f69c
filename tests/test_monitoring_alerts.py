"""Alerts fired by real failures: a real Prometheus (Debian's) scraping two tiny-model replicas
with the shipped alert rules (``lab_rules``: every ``for:`` 2 s, the rest as shipped); one
replica is killed and LmrefReplicaDown goes pending, then firing, while no other alert does.
And a Batch worker's metrics, counted in a forked pool process, served by its parent."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmref.lab.lifecycle_servers import start_prometheus
from lmref.lab.prometheus_api import alerts, query, wait_for_alert
from lmref.lab.servers import start_replica
from lmref.lab.services import Services

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_a_killed_replica_pages(tiny_model_dir):
    with Services() as services:
        model = f"tiny={tiny_model_dir}"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both load at once
            started = [pool.submit(start_replica, model, timeout=120) for _ in range(2)]
            replicas = [services.add(f.result()) for f in started]
        prom = services.add(start_prometheus([f"127.0.0.1:{r.port}" for r in replicas]))
        # Both replicas scraped, with their process metrics: nothing is active yet.
        deadline = time.monotonic() + 30
        while len(query(prom.url, 'up{job="lmref-replica"} == 1')) < 2:
            assert time.monotonic() < deadline, query(prom.url, "up")
            time.sleep(0.2)
        assert len(query(prom.url, "process_resident_memory_bytes > 1e6")) == 2
        assert alerts(prom.url) == []

        killed = time.monotonic()
        replicas[0].kill()  # SIGKILL: nothing gets to say goodbye
        pending = wait_for_alert(prom.url, "LmrefReplicaDown", "pending", timeout=30)
        pending_s = time.monotonic() - killed
        firing = wait_for_alert(prom.url, "LmrefReplicaDown", "firing", timeout=30)
        firing_s = time.monotonic() - killed
        assert firing["labels"]["instance"] == f"127.0.0.1:{replicas[0].port}"
        assert firing["labels"]["severity"] == "critical"
        assert pending["labels"] == firing["labels"]
        # Only the dead replica pages: the live one, and every other rule, stay silent.
        assert [a["labels"]["alertname"] for a in alerts(prom.url)] == ["LmrefReplicaDown"]
        print(f"kill -> pending {pending_s:.1f} s, -> firing {firing_s:.1f} s")
        assert firing_s < 30


def test_worker_counters_add_up_across_forked_pool_processes():
    """The worker's design in a real fork: a child counts, exits; the parent's endpoint (a
    prefork worker's main process) serves the child's counts and the tree's CPU and memory."""
    from lmref.lab.services import free_port

    port = free_port()
    script = textwrap.dedent(f"""
        import os, urllib.request
        os.environ["LMREF_METRICS_PORT"] = "{port}"
        os.environ["LMREF_METRICS_HOST"] = "127.0.0.1"
        from lmref.production import worker_metrics
        assert worker_metrics.prepare()
        metrics = worker_metrics.WorkerMetrics()
        metrics.serve()
        pid = os.fork()
        if pid == 0:  # a pool process: it runs the requests
            metrics.lines.labels(status="200").inc(3)
            metrics.failures.labels(code="worker_error").inc()
            os._exit(0)
        os.waitpid(pid, 0)
        metrics.failures.labels(code="time_limit_exceeded").inc()  # the main process's own
        url = "http://127.0.0.1:{port}/metrics"
        print(urllib.request.urlopen(url, timeout=10).read().decode())
    """)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert 'lmref:worker_lines_total{status="200"} 3.0' in text
    assert 'lmref:worker_task_failures_total{code="worker_error"} 1.0' in text
    assert 'lmref:worker_task_failures_total{code="time_limit_exceeded"} 1.0' in text
    cpu = float(re.search(r"^process_cpu_seconds_total (\S+)", text, re.M).group(1))
    rss = float(re.search(r"^process_resident_memory_bytes (\S+)", text, re.M).group(1))
    assert cpu > 0 and rss > 10e6
