"""Monitoring that pages: the Prometheus configuration and alert rules of deploy/prometheus/
(promtool checks them and runs their unit tests), the Grafana dashboard against the metrics the
server really exports, and (integration) a real Prometheus scraping two replicas, one of which
is killed: LmrefReplicaDown goes pending, then firing, and no other alert does."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lmref.lab.lifecycle_servers import ALERT_RULES, SCRAPE_CONFIG, lab_rules, prometheus_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "prometheus"
needs_promtool = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


@needs_promtool
def test_promtool_accepts_the_rules_and_their_unit_tests_pass():
    checked = promtool("check", "rules", str(ALERT_RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout
    tested = promtool("test", "rules", str(DEPLOY / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has its for:, a severity, a summary and a description; and a unit test.
    rules = yaml.safe_load(ALERT_RULES.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "LmrefReplicaDown",
        "LmrefHighErrorRate",
        "LmrefHighP99Latency",
        "LmrefBatchQueueBacklog",
        "LmrefVersionErrorRateAboveChampion",
    }
    tests = (DEPLOY / "alerts_test.yml").read_text()
    for a in alerts:
        assert a["for"] and a["labels"]["severity"] in ("critical", "warning"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        assert f"alertname: {a['alert']}" in tests, f"{a['alert']} has no promtool test"


@needs_promtool
def test_promtool_checks_a_broken_rule_live(tmp_path):
    broken = ALERT_RULES.read_text().replace('up{job="lmref-replica"} == 0', "up{job= == 0", 1)
    (tmp_path / "alerts.yml").write_text(broken)
    assert promtool("check", "rules", str(tmp_path / "alerts.yml")).returncode != 0


@needs_promtool
def test_promtool_accepts_the_scrape_config(tmp_path):
    shipped = promtool("check", "config", str(SCRAPE_CONFIG))
    if shipped.returncode != 0:  # Debian's build has no Kubernetes discovery: only that may fail
        assert "kubernetes_sd_configs not found" in shipped.stdout + shipped.stderr
    config = prometheus_config({"lmref-replica": ["127.0.0.1:1"]}, ALERT_RULES)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    lab = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert lab.returncode == 0, lab.stdout + lab.stderr
    assert [j["job_name"] for j in config["scrape_configs"]] == ["lmref-replica"]
    with pytest.raises(ValueError, match="no scrape job"):
        prometheus_config({"nonsense": ["127.0.0.1:1"]}, ALERT_RULES)


def test_lab_rules_differ_from_the_shipped_ones_in_for_only(tmp_path):
    shipped = yaml.safe_load(ALERT_RULES.read_text())
    lab = yaml.safe_load(Path(lab_rules(for_="3s", workdir=str(tmp_path))).read_text())
    for g_shipped, g_lab in zip(shipped["groups"], lab["groups"], strict=True):
        for r_shipped, r_lab in zip(g_shipped["rules"], g_lab["rules"], strict=True):
            if "alert" in r_shipped:
                assert r_lab.pop("for") == "3s" and r_shipped.pop("for") != "3s"
            assert r_lab == r_shipped


def test_k8s_configmap_ships_the_files_unchanged():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "monitoring.yaml").read_text()))
    data = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert data["alerts.yml"] == ALERT_RULES.read_text()
    assert data["prometheus.yml"] == SCRAPE_CONFIG.read_text()
    worker = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "worker.yaml").read_text())
    pod = next(d for d in worker if d["kind"] == "Deployment")["spec"]["template"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["LMREF_METRICS_PORT"] == pod["metadata"]["annotations"]["prometheus.io/port"]


def exported_names(text: str) -> set[str]:
    """The sample names a /metrics text can hold, from its TYPE lines (a family with no sample
    yet still has one)."""
    suffixes = {
        "counter": ["", "_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
    }
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        base = family.removesuffix("_total") if kind == "counter" else family
        names |= {base + s for s in suffixes.get(kind, [""])}
    return names


def test_grafana_dashboard_names_only_metrics_the_server_exports(tiny_model_dir):
    from lmref.production.batch_api import QueueDepthCollector
    from lmref.production.shared_cache import RedisResponseCache
    from lmref.serving.app import ModelSpec, ServingConfig, create_app

    app = create_app(ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))]), start=False)
    registry = app.extensions["lmref"].metrics.registry
    # What a replica adds with a Batch API and a shared cache: their own collectors' families.
    queue = QueueDepthCollector(None, "lmref-batch")
    queue.read = lambda: (3, 1)  # the broker's answer, without a broker
    registry.register(queue)
    RedisResponseCache("redis://127.0.0.1:1/0").register(registry)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'lmref:batch_queue_depth{queue="lmref-batch"} 3.0' in text
    exported = exported_names(text) | {"up"}  # up: Prometheus's own, per target
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= exported

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "lmref-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    metric = r"\b(lmref:[a-z0-9_]+|process_[a-z_]+|python_[a-z_]+|up)\b(?=\s*[\[{)])"
    used = {n for e in exprs for n in re.findall(metric, e)}
    assert len(used) >= 14, used
    missing = used - exported
    assert not missing, missing
    titles = " ".join(p["title"] for p in dashboard["panels"])
    assert "per model version" in titles and "CPU" in titles and "memory" in titles


def test_worker_metrics_refuse_a_mode_chosen_too_late():
    from lmref.production import worker_metrics

    assert worker_metrics.prepare({}) is False  # no port: nothing to do
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        worker_metrics.prepare({"LMREF_METRICS_PORT": "9100"})  # prometheus_client is imported
