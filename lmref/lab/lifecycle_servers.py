"""Starters for the model lifecycle's servers, on 127.0.0.1 and a free port like those of
``lmref.lab.servers``: an MLflow tracking server (a SQLite backend store and a local artifact
store, both in the service's temporary folder) and Prometheus (Debian's ``prometheus``) with
the deployment's own scrape jobs and alert rules (``deploy/prometheus/``) on loopback targets.

Usage::

    from lmref.lab.lifecycle_servers import start_mlflow, start_prometheus
    from lmref.lab.services import Services

    with Services() as services:
        mlflow_server = services.add(start_mlflow())    # mlflow_server.url: http://127.0.0.1:PORT
        # mlflow.set_tracking_uri(mlflow_server.url); runs, models and aliases live there
        prom = services.add(start_prometheus({"lmref-replica": ["127.0.0.1:8000"]}))
        # lmref.lab.prometheus_api.alerts(prom.url): the alerts, pending or firing
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from lmref.lab.services import Service, free_port, http_ok

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
SCRAPE_CONFIG = DEPLOY / "prometheus.yml"  # the deployment's (DNS discovery in Kubernetes)
ALERT_RULES = DEPLOY / "alerts.yml"


def start_mlflow(timeout: float = 120.0, workdir: str | None = None) -> Service:
    """``mlflow server`` with a SQLite backend (runs and the model registry) and an artifact
    store it serves itself (``mlflow-artifacts:/``: clients upload and download through the
    server, as they would against a remote one), both in ``workdir`` (a temporary folder removed
    on stop unless given). One worker is enough for a course; the first start creates the
    database's tables (about 10 s here)."""
    owns = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="lmref-mlflow-")
    port = free_port()
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    args = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"]
    args += ["--artifacts-destination", os.path.join(workdir, "artifacts")]
    # No job runner: MLflow 3 starts two huey consumer pools (15 worker threads) for its GenAI
    # jobs by default, which tracking and the registry do not use; on 2 cores they only compete.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"
    service = Service(
        f"mlflow-{port}", args, env=env, workdir=workdir, url=url, port=port, owns_workdir=owns
    )
    return service.wait_until(lambda: http_ok(service.url + "/health"), timeout)


def lab_rules(
    rules_file: str | os.PathLike = ALERT_RULES, for_: str = "2s", workdir: str = ""
) -> str:
    """A copy of ``rules_file`` in ``workdir`` (default: a new temporary folder) with every
    alert's ``for:`` set to ``for_``, its one difference: expressions, thresholds, labels and
    annotations are the shipped ones. A lesson cannot wait the minutes a production ``for:``
    asks (one bad scrape must not page anybody); the rest of the rule is what it tests."""
    import yaml

    with open(rules_file) as f:
        rules = yaml.safe_load(f)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = for_
    path = os.path.join(workdir or tempfile.mkdtemp(prefix="lmref-rules-"), "alerts.lab.yml")
    with open(path, "w") as f:
        yaml.safe_dump(rules, f, sort_keys=False)
    return path


def prometheus_config(
    targets: dict[str, list[str]],
    rules_file: str | os.PathLike,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
) -> dict:
    """The deployment's ``prometheus.yml`` with its discovery replaced by ``targets`` (job name
    -> ["127.0.0.1:PORT", ...]): the jobs keep their names and settings, so the rules'
    ``up{job="lmref-replica"}`` match; a job with no target is left out."""
    import yaml

    with open(SCRAPE_CONFIG) as f:
        config = yaml.safe_load(f)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    unknown = set(targets) - set(jobs)
    if unknown:
        raise ValueError(
            f"no scrape job {sorted(unknown)} in {SCRAPE_CONFIG}; jobs: {sorted(jobs)}"
        )
    config["global"] = {
        "scrape_interval": scrape_interval,
        "scrape_timeout": scrape_interval,  # must not exceed the interval
        "evaluation_interval": evaluation_interval,
    }
    config["rule_files"] = [os.path.abspath(rules_file)]
    config["scrape_configs"] = []
    for name, addresses in targets.items():
        job = {k: v for k, v in jobs[name].items() if not k.endswith("_sd_configs")}
        job.pop("relabel_configs", None)  # they read discovery labels, absent here
        job["static_configs"] = [{"targets": list(addresses)}]
        config["scrape_configs"].append(job)
    return config


def start_prometheus(
    targets: dict[str, list[str]] | list[str],
    rules_file: str | os.PathLike | None = None,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    timeout: float = 60.0,
) -> Service:
    """Debian's ``prometheus`` on 127.0.0.1 and a free port, scraping ``targets`` (job name ->
    addresses, or a list: the ``lmref-replica`` job) with the deployment's jobs
    (``prometheus_config``) and ``rules_file`` (default: ``lab_rules()``, the shipped alerts
    with a ``for:`` of 2 s), its database in the service's temporary folder; ready when
    ``/-/ready`` answers 200 (about 1 s)."""
    import yaml

    if isinstance(targets, list):
        targets = {"lmref-replica": targets}
    workdir = tempfile.mkdtemp(prefix="lmref-prometheus-")
    rules_file = rules_file or lab_rules(workdir=workdir)
    config = prometheus_config(targets, rules_file, scrape_interval, evaluation_interval)
    config_file = os.path.join(workdir, "prometheus.yml")
    with open(config_file, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    port = free_port()
    args = [
        "prometheus",
        f"--config.file={config_file}",
        f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
    ]
    url = f"http://127.0.0.1:{port}"
    service = Service(
        f"prometheus-{port}", args, workdir=workdir, url=url, port=port, owns_workdir=True
    )
    service.config_file, service.rules_file = config_file, str(rules_file)
    return service.wait_until(lambda: http_ok(service.url + "/-/ready"), timeout)
