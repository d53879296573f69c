"""A few calls to Prometheus's HTTP API for tests and notebooks: an instant query, the alerts
(pending and firing) and a bounded wait for an alert to reach a state. Standard library only
(urllib): three GETs do not need a client library.

Usage::

    from lmref.lab.prometheus_api import alerts, query, wait_for_alert

    query(prom.url, 'up{job="lmref-replica"}')           # [{"metric": {...}, "value": [t, "1"]}]
    alert = wait_for_alert(prom.url, "LmrefReplicaDown", "firing", timeout=30)
    alert["labels"]["instance"], alert["activeAt"]
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def api(url: str, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> Any:
    """GET ``url + path`` and return its ``data``; a Prometheus error raises with its message."""
    full = url.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(full, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as err:  # a bad query: 400 with Prometheus's own message
        body = json.load(err)
    if body.get("status") != "success":
        raise ValueError(f"Prometheus {path}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(url: str, promql: str) -> list[dict]:
    """An instant query's vector: ``[{"metric": {labels}, "value": [time, "text"]}, ...]``."""
    return api(url, "/api/v1/query", {"query": promql})["result"]


def alerts(url: str, name: str | None = None) -> list[dict]:
    """The active alerts (``state``: pending or firing; inactive ones are not listed), or only
    those called ``name``."""
    found = api(url, "/api/v1/alerts")["alerts"]
    return [a for a in found if name is None or a["labels"].get("alertname") == name]


def wait_for_alert(url: str, name: str, state: str = "firing", timeout: float = 60.0) -> dict:
    """The first alert ``name`` in ``state`` (pending or firing), polled every 0.2 s; a
    ``TimeoutError`` naming the states seen when it does not come within ``timeout`` s."""
    deadline, seen = time.monotonic() + timeout, set()
    while True:
        for alert in alerts(url, name):
            seen.add(alert["state"])
            if alert["state"] == state:
                return alert
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{name} not {state} after {timeout} s (states seen: {sorted(seen)})"
            )
        time.sleep(0.2)
