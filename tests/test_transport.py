"""Transport and secrets: TLS at nginx (the official openai client with the test CA, and without
it), RabbitMQ and Redis that refuse the anonymous and the default, credentials read from files
as Kubernetes mounts Secrets, nginx's JSON access log with request ids, no secret in any log line
the tests collect, and the Kubernetes manifests holding every credential in Secrets."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

pytest.importorskip("celery")
redis = pytest.importorskip("redis")
openai = pytest.importorskip("openai")
import amqp  # noqa: E402  (celery's transport)
import httpx  # noqa: E402

from lmref.core.credentials import read_secret, redact, service_url, with_credentials  # noqa: E402
from lmref.lab.servers import (  # noqa: E402
    start_celery_worker,
    start_nginx,
    start_rabbitmq,
    start_redis,
    start_replica,
)
from lmref.lab.services import Services  # noqa: E402
from lmref.lab.tls import make_certificates  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-transport-" + "7f3a9c1e5b"
needs_servers = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("redis-server", "nginx", "openssl"))
    or not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists(),
    reason="redis-server, rabbitmq-server, nginx and openssl come from Debian (make system)",
)


# ------------------------------------------------------------------------------ real servers
@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """Redis and RabbitMQ with passwords; a replica (Batch API and shared cache) and a Celery
    worker that read them from files, as a pod reads a mounted Secret; nginx with TLS in front."""
    from lmref.production.worker import READY_LINE

    certs = make_certificates(str(tmp_path_factory.mktemp("tls")))
    secrets_dir = tmp_path_factory.mktemp("secrets")
    with Services() as services:
        cache = services.add(start_redis())
        rabbit = services.add(start_rabbitmq())

        def secret(name: str, value: str) -> str:
            path = secrets_dir / name
            path.write_text(value + "\n")  # as `kubectl create secret --from-file` keeps it
            path.chmod(0o600)
            return str(path)

        env = {  # the URLs say where; the credentials are files (the manifests' way)
            "LMREF_CACHE_URL_FILE": secret("cache-url", cache.url),
            "LMREF_STORE_URL": f"redis://127.0.0.1:{cache.port}/1",
            "LMREF_STORE_PASSWORD_FILE": secret("store-password", cache.password),
            "LMREF_BROKER_URL": f"amqp://127.0.0.1:{rabbit.port}//",
            "LMREF_BROKER_USERNAME": "lmref",
            "LMREF_BROKER_PASSWORD_FILE": secret("broker-password", rabbit.password),
            "LMREF_SWEEP_INTERVAL_S": "0",
            "LMREF_WORKER_MODELS": f"tiny={tiny_model_dir}",
        }
        worker = services.add(
            start_celery_worker("lmref.production.celery_worker", "t1", env, wait=False)
        )
        replica = services.add(
            start_replica(
                f"tiny={tiny_model_dir}", ["--api-key", KEY, "--torch-threads", "1"], env=env
            )
        )
        lb = services.add(start_nginx([f"127.0.0.1:{replica.port}"], tls=certs))
        worker.wait_for_text(READY_LINE, timeout=120)
        yield {"certs": certs, "cache": cache, "rabbit": rabbit, "replica": replica, "lb": lb,
               "worker": worker, "services": services}  # fmt: skip


def trusting(certs, **kw):
    return openai.OpenAI(
        http_client=httpx.Client(verify=certs.ca_cert, timeout=60), max_retries=0, **kw
    )


@needs_servers
@pytest.mark.integration
def test_openai_client_talks_tls_with_the_test_ca_and_fails_without(stack):
    lb, certs = stack["lb"], stack["certs"]
    assert lb.url.startswith("https://127.0.0.1:")
    client = trusting(certs, base_url=lb.url + "/v1", api_key=KEY)
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="def f(", max_tokens=4, extra_headers={"X-Request-ID": "tls-req-1"}
    )
    assert raw.parse().choices[0].text is not None
    assert raw.headers["X-Request-ID"] == "tls-req-1"  # the client's id, through nginx and back
    assert raw.headers["X-Upstream"] == f"127.0.0.1:{stack['replica'].port}"
    # The default trust store (certifi) does not know the test CA: refused before any request.
    default = openai.OpenAI(base_url=lb.url + "/v1", api_key=KEY, max_retries=0, timeout=10)
    with pytest.raises(openai.APIConnectionError) as err:
        default.models.list()
    causes, e = [], err.value
    while e is not None:
        causes.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("CERTIFICATE_VERIFY_FAILED" in c for c in causes), causes
    # Plain HTTP to the TLS port: nginx answers 400, nothing reaches the replica.
    plain = requests.get(
        lb.url.replace("https://", "http://") + "/v1/models",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert plain.status_code == 400 and "plain HTTP request was sent to HTTPS port" in plain.text
    assert "data" not in plain.text


@needs_servers
@pytest.mark.integration
def test_tls_is_1_2_or_newer_and_the_certificate_names_loopback(stack):
    import socket
    import ssl

    context = ssl.create_default_context(cafile=stack["certs"].ca_cert)
    for name in ("127.0.0.1", "localhost"):  # both subjectAltNames verify
        with socket.create_connection(("127.0.0.1", stack["lb"].port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", stack["lb"].port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname="example.com")


@needs_servers
@pytest.mark.integration
def test_rabbitmq_refuses_guest_and_accepts_its_user(stack):
    rabbit = stack["rabbit"]
    host = f"127.0.0.1:{rabbit.port}"
    for user, password in (("guest", "guest"), ("lmref", "wrong-password")):
        connection = amqp.Connection(host, userid=user, password=password, connect_timeout=10)
        with pytest.raises(amqp.exceptions.AccessRefused):
            connection.connect()
    connection = amqp.Connection(host, userid="lmref", password=rabbit.password, connect_timeout=10)
    connection.connect()
    try:
        assert connection.connected
    finally:
        connection.close()
    assert rabbit.url == f"amqp://lmref:{rabbit.password}@{host}//"


@needs_servers
@pytest.mark.integration
def test_redis_refuses_no_password_and_accepts_the_urls(stack):
    from lmref.production.connections import redis_client

    cache = stack["cache"]
    assert len(cache.password) >= 32 and f":{cache.password}@" in cache.url
    for client in (
        redis.Redis(host="127.0.0.1", port=cache.port, socket_timeout=5),
        redis.Redis(host="127.0.0.1", port=cache.port, password="wrong", socket_timeout=5),
    ):
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)) as err:
            client.ping()
        assert re.search(
            r"NOAUTH|WRONGPASS|authenticat|invalid username-password", str(err.value), re.I
        ), err.value
    assert redis_client(cache.url).ping()


@needs_servers
@pytest.mark.integration
def test_batch_runs_through_the_passworded_queue_and_store(stack, tmp_path):
    """The replica (producer, store) and the worker (consumer, store, cache) got their
    credentials from files: a batch that completes used every one of them."""
    client = trusting(stack["certs"], base_url=stack["lb"].url + "/v1", api_key=KEY)
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": "x", "max_tokens": 3, "temperature": 0},
    }
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(line) + "\n")
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.request_counts.completed == 1
    assert stack["worker"].seen(f"amqp://lmref:**@127.0.0.1:{stack['rabbit'].port}//")


@needs_servers
@pytest.mark.integration
def test_access_log_is_json_with_request_ids_and_no_credentials(stack):
    lb = stack["lb"]
    client = httpx.Client(verify=stack["certs"].ca_cert, timeout=60)
    auth = {"Authorization": f"Bearer {KEY}"}
    given = client.get(lb.url + "/v1/models", headers={**auth, "X-Request-ID": "log-req-7"})
    made = client.get(lb.url + "/v1/models", headers=auth)
    junk = client.get(lb.url + "/v1/models", headers={**auth, "X-Request-ID": 'a" b'})
    denied = client.get(lb.url + "/v1/models", headers={"Authorization": "Bearer sk-not-a-key"})
    assert given.status_code == made.status_code == junk.status_code == 200
    assert denied.status_code == 401
    assert given.headers["X-Request-ID"] == "log-req-7"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])  # nginx's $request_id
    assert re.fullmatch(r"[0-9a-f]{32}", junk.headers["X-Request-ID"])  # not a token: replaced
    deadline = time.monotonic() + 5
    while True:
        text = Path(lb.access_log).read_text()
        lines = [json.loads(x) for x in text.splitlines()]
        ids = {x["request_id"]: x for x in lines}
        if denied.headers["X-Request-ID"] in ids or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for response in (given, made, junk, denied):
        entry = ids[response.headers["X-Request-ID"]]
        assert entry["method"] == "GET" and entry["uri"] == "/v1/models"
        assert entry["status"] == response.status_code
        assert entry["upstream"] == f"127.0.0.1:{stack['replica'].port}"
        assert entry["tls"] in ("TLSv1.2", "TLSv1.3") and entry["request_time"] >= 0
    assert KEY not in text and "sk-not-a-key" not in text and "Bearer" not in text


@needs_servers
@pytest.mark.integration
def test_no_secret_in_any_log_line(stack):
    services = stack["services"]
    client = trusting(stack["certs"], base_url=stack["lb"].url + "/v1", api_key=KEY)
    client.completions.create(model="tiny", prompt="y", max_tokens=2)  # some traffic to log
    secrets = {KEY, stack["cache"].password, stack["rabbit"].password}
    lines = [line for s in services.items for line in s.output]
    lines += Path(stack["lb"].access_log).read_text().splitlines()
    lines += Path(stack["lb"].error_log).read_text().splitlines()
    assert len(lines) > 20
    leaked = [line for line in lines for s in secrets if s in line]
    assert not leaked, leaked
    # The check is live: the replica does log where its backends are, redacted.
    replica = stack["replica"]
    assert replica.seen(f"broker_url amqp://lmref:***@127.0.0.1:{stack['rabbit'].port}//")
    assert replica.seen(f"store_url redis://:***@127.0.0.1:{stack['cache'].port}/1")
    assert all(s not in repr(x) for x in services.items for s in secrets)


# ------------------------------------------------------------------------ no servers: unit
@pytest.mark.unit
def test_credentials_come_from_the_environment_or_files(tmp_path):
    (tmp_path / "pw").write_text("p@ss:w/rd\n")
    env = {
        "LMREF_BROKER_URL": "amqp://rabbit:5672//",
        "LMREF_BROKER_USERNAME": "lmref",
        "LMREF_BROKER_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    url = service_url("LMREF_BROKER", env)
    assert url == "amqp://lmref:p%40ss%3Aw%2Frd@rabbit:5672//"
    assert redact(url) == "amqp://lmref:***@rabbit:5672//"
    assert read_secret("LMREF_BROKER_PASSWORD", env) == "p@ss:w/rd"
    assert service_url("LMREF_STORE", env) is None
    assert service_url("LMREF_STORE", {"LMREF_STORE_URL": "redis://h:1/0"}) == "redis://h:1/0"
    with pytest.raises(ValueError, match="both"):
        read_secret("X", {"X": "a", "X_FILE": str(tmp_path / "pw")})
    assert with_credentials("redis://h:6379/0", None, "pw") == "redis://:pw@h:6379/0"
    assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://h:6379/0?password=pw&db=1") == "redis://h:6379/0?password=***&db=1"
    assert redact("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    from lmref.production.celery_app import BatchConfig

    assert "guest" not in BatchConfig().broker_url


def k8s_docs() -> list[dict]:
    import yaml

    return [
        doc
        for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


URL_WITH_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]*@")
# A name part, not a substring: TOKENIZERS_PARALLELISM is no token.
SECRET_NAME = re.compile(r"(^|_)(PASS\w*|SECRET|KEYS?|TOKEN|CREDENTIALS?|AUTH)(_|$)", re.I)


def credential_problems(docs: list[dict], comments: str) -> list[str]:
    """Credentials outside Secrets: a URL with a password or a secret-named key with a value in a
    ConfigMap, a Secret with a literal value in the repository, a container env var holding
    one; and Secrets used but nowhere documented (the kubectl create commands)."""
    problems, used = [], set()
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                if URL_WITH_PASSWORD.search(value):
                    problems.append(f"{name}.{key}: a URL with credentials")
                # A URL's name may say KEY (the key store's): its value is checked above.
                if SECRET_NAME.search(key) and not (
                    key.endswith("_URL")
                    or (key.endswith("_FILE") and value.startswith("/var/run/secrets/"))
                ):
                    problems.append(f"{name}.{key}: a secret in a ConfigMap")
        if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"Secret {name}: a literal value in the repository")
        text = json.dumps(doc)
        used |= set(re.findall(r'"(?:secretName|name)": "([\w-]+)", "key"', text))
        used |= set(re.findall(r'"secretName": "([\w-]+)"', text))
        used |= set(re.findall(r'"secretRef": \{"name": "([\w-]+)"', text))
        for match in re.finditer(r'\{"name": "([A-Z_]+)", "value": "([^"]*)"\}', text):
            if SECRET_NAME.search(match[1]) or URL_WITH_PASSWORD.search(match[2]):
                problems.append(f"{name}: env {match[1]} holds a literal secret")
    documented = set(re.findall(r"kubectl create secret \w+ ([\w-]+)", comments))
    problems += [f"Secret {s} used, its creation not documented" for s in used - documented]
    return problems


@pytest.mark.unit
def test_kubernetes_manifests_keep_every_credential_in_secrets():
    comments = "".join(p.read_text() for p in (ROOT / "deploy" / "k8s").glob("*.yaml"))
    docs = k8s_docs()
    assert credential_problems(docs, comments) == []
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    # Each backend takes its credentials from a Secret ...
    for kind, name in (("Deployment", "lmref-cache"), ("StatefulSet", "lmref-store")):
        container = kinds[(kind, name)]["spec"]["template"]["spec"]["containers"][0]
        assert "--requirepass" in container["args"]
        assert (
            container["args"][container["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
        )
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["REDIS_PASSWORD"]["valueFrom"]
    rabbit = kinds[("StatefulSet", "lmref-rabbitmq")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in rabbit["env"]}
    for name in ("RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS"):
        assert "secretKeyRef" in env[name]["valueFrom"]
    # ... and every client reads each file the ConfigMap names from a mounted Secret.
    config = kinds[("ConfigMap", "lmref-config")]["data"]
    files = [v for k, v in config.items() if k.endswith("_FILE")]
    assert len(files) >= 4
    for workload in ("lmref-server", "lmref-worker"):
        spec = kinds[("Deployment", workload)]["spec"]["template"]["spec"]
        secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
        mounts = [
            m["mountPath"]
            for m in spec["containers"][0]["volumeMounts"]
            if m["name"] in secret_volumes
        ]
        assert all(any(f.startswith(m + "/") for m in mounts) for f in files), workload
    ingress = kinds[("Ingress", "lmref")]["spec"]
    assert ingress["tls"][0]["secretName"] == "lmref-tls"
    assert "kubectl create secret tls lmref-tls" in comments
    # No credential baked into the images.
    for dockerfile in (ROOT / "deploy").glob("Dockerfile*"):
        text = dockerfile.read_text()
        assert not URL_WITH_PASSWORD.search(text), dockerfile
        names = re.findall(r"\b([A-Za-z_]+)=", text)  # ENV and ARG settings, any other
        assert names and not [n for n in names if SECRET_NAME.search(n)], dockerfile
    # The check is live: the manifests as they were fail it.
    broken = json.loads(json.dumps(docs))
    for doc in broken:
        if doc["metadata"]["name"] == "lmref-config":
            doc["data"]["LMREF_BROKER_URL"] = "amqp://guest:guest@lmref-rabbitmq:5672//"
    broken.append(
        {
            "kind": "Secret",
            "metadata": {"name": "lmref-api-keys"},
            "stringData": {"LMREF_API_KEYS": "change-me"},
        }  # fmt: skip
    )
    assert len(credential_problems(broken, "")) >= 6, credential_problems(broken, "")
