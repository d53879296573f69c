"""Faults to inject into the real servers of ``lmref.lab.servers``, and what a client sees
meanwhile: a process frozen (SIGSTOP: its port accepts connections, nothing answers, as with a
server stuck on a dead disk), one probe of an HTTP endpoint, one metric read. Standard library only.

Usage::

    from lmref.lab.faults import frozen, metric, probe

    with frozen(store_redis):
        print(probe(lb.url, "/v1/batches/" + batch_id, api_key))   # {'status': 503, ...}
        print(metric(replica.url, "lmref:batch_queue_depth"))      # messages still waiting
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from lmref.lab.services import Service


@contextlib.contextmanager
def frozen(service: Service) -> Iterator[Service]:
    """SIGSTOP for the ``with`` block, SIGCONT after it (even when the block fails)."""
    os.kill(service.pid, signal.SIGSTOP)
    try:
        yield service
    finally:
        os.kill(service.pid, signal.SIGCONT)


def probe(url: str, path: str, api_key: str | None = None, timeout: float = 30.0) -> dict:
    """One GET: its status, ``Retry-After``, the OpenAI error code (if any) and its seconds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url + path, headers=headers), timeout=timeout
        ) as r:
            status, retry_after, body = r.status, r.headers.get("Retry-After"), r.read()
    except urllib.error.HTTPError as err:
        status, retry_after, body = err.code, err.headers.get("Retry-After"), err.read()
    seconds = time.perf_counter() - started
    try:
        code = (json.loads(body).get("error") or {}).get("code")
    except (ValueError, AttributeError):
        code = None
    return {
        "status": status,
        "Retry-After": retry_after,
        "code": code,
        "seconds": round(seconds, 2),
    }


def metric(url: str, name: str) -> float | None:
    """A metric of ``url + "/metrics"``, summed over its labels (None: not exported now)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    values = [
        float(line.rsplit(" ", 1)[1]) for line in lines if line.split("{")[0].split(" ")[0] == name
    ]
    return sum(values) if values else None
