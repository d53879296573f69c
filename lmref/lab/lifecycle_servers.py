"""Starters for the model lifecycle's servers, on 127.0.0.1 and a free port like those of
``lmref.lab.servers``: an MLflow tracking server (a SQLite backend store and a local artifact
store, both in the service's temporary folder) and Prometheus (Debian's ``prometheus``).

Usage::

    from lmref.lab.lifecycle_servers import start_mlflow
    from lmref.lab.services import Services

    with Services() as services:
        mlflow_server = services.add(start_mlflow())    # mlflow_server.url: http://127.0.0.1:PORT
        # mlflow.set_tracking_uri(mlflow_server.url); runs, models and aliases live there
"""

from __future__ import annotations

import os
import sys
import tempfile

from lmref.lab.services import Service, free_port, http_ok


def start_mlflow(timeout: float = 120.0, workdir: str | None = None) -> Service:
    """``mlflow server`` with a SQLite backend (runs and the model registry) and an artifact
    store it serves itself (``mlflow-artifacts:/``: clients upload and download through the
    server, as they would against a remote one), both in ``workdir`` (a temporary folder removed
    on stop unless given). One worker is enough for a course; the first start creates the
    database's tables (about 10 s here)."""
    owns_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="lmref-mlflow-")
    port = free_port()
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    args = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"]
    args += ["--artifacts-destination", os.path.join(workdir, "artifacts")]
    service = Service(
        f"mlflow-{port}", args, workdir=workdir, url=f"http://127.0.0.1:{port}", port=port
    )
    service._owns_workdir = owns_workdir
    return service.wait_until(lambda: http_ok(service.url + "/health"), timeout)
