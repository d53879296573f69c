"""The audit trail (lmref.serving.audit): an X-Request-ID on every answer, one JSON access-log
line per request with the key's id (never the key) and the tokens the response reported, the
request id in the engine's log lines, and a Batch line's request id in its worker's log."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

from lmref.lab.servers import REQUEST_ID_PATTERN
from lmref.serve import start_server
from lmref.serving.app import ModelSpec, ServingConfig
from lmref.serving.audit import HEADER, SAFE_ID, request_id_from

KEY = "sk-audit-secret-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}
GENERATED = r"req_[0-9a-f]{32}"


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "lmref.access"]


def line_of(caplog, request_id: str) -> dict:
    """The one access line of a request, once its response has closed."""
    found = wait_for(lambda: [x for x in access_lines(caplog) if x["request_id"] == request_id])
    assert len(found) == 1, found
    return found[0]


def no_secret_in(texts: list[str]) -> None:
    leaked = [t for t in texts if KEY in t or "Bearer" in t]
    assert not leaked, leaked


@pytest.mark.unit
def test_request_ids_are_kept_only_when_safe():
    assert request_id_from("client-42.a:b_c") == "client-42.a:b_c"
    for unsafe in (None, "", "a b", "x\ny", '{"key": 1}', "a" * 129, "-leading", "é"):
        got = request_id_from(unsafe)
        assert re.fullmatch(GENERATED, got), (unsafe, got)
    assert SAFE_ID.fullmatch("a" * 128)
    # nginx in front keeps the same ids (its map in lmref.lab.servers): one id per request.
    assert REQUEST_ID_PATTERN == SAFE_ID.pattern


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = ServingConfig(
        models=[ModelSpec("tiny", str(tiny_model_dir), max_queue_size=4)],
        api_keys=[KEY],
        cache_size=0,
        torch_threads=1,
        server_threads=8,
    )
    handle = start_server(config)
    yield handle
    handle.stop(drain_timeout=5)


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger="lmref.access")
    caplog.set_level(logging.INFO, logger="lmref.serving")
    return caplog


@pytest.mark.integration
def test_every_answer_carries_a_request_id(server, access):
    url = server.url
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    given = requests.post(url + "/v1/completions", json=body, headers={**AUTH, HEADER: "abc-1"})
    assert given.status_code == 200 and given.headers[HEADER] == "abc-1"
    made = requests.post(url + "/v1/completions", json=body, headers=AUTH)
    assert made.status_code == 200
    assert re.fullmatch(GENERATED, made.headers[HEADER])
    unsafe = requests.post(
        url + "/v1/completions", json=body, headers={**AUTH, HEADER: "evil id\t{}"}
    )
    assert unsafe.headers[HEADER] != "evil id\t{}"
    assert unsafe.headers[HEADER].startswith("req_")
    errors = {
        401: requests.post(url + "/v1/completions", json=body, headers={HEADER: "e-401"}),
        404: requests.get(url + "/v1/nothing", headers={**AUTH, HEADER: "e-404"}),
        400: requests.post(  # 2 prompts x n=3 rows can never fit a queue of 4
            url + "/v1/completions",
            json={**body, "prompt": ["a", "b"], "n": 3},
            headers={**AUTH, HEADER: "e-400"},
        ),
        413: requests.post(
            url + "/v1/completions", data=b"x" * (2 << 20), headers={**AUTH, HEADER: "e-413"}
        ),
    }
    for status, response in errors.items():
        assert response.status_code == status, (status, response.text)
        assert response.headers[HEADER] == f"e-{status}"
        if status == 413:  # waitress answers it from Content-Length: Flask never sees it
            continue
        line = line_of(access, f"e-{status}")
        assert line["status"] == status and line["completion_tokens"] == 0
    assert line_of(access, "e-401")["key_id"] is None  # no key, no id: nothing to name
    probe = requests.get(url + "/health", headers={HEADER: "probe-1"})
    assert probe.headers[HEADER] == "probe-1"
    assert not [x for x in access_lines(access) if x["request_id"] == "probe-1"]  # not logged
    no_secret_in([r.getMessage() for r in access.records] + [access.text])


@pytest.mark.integration
def test_one_access_line_per_request_with_its_tokens(server, access):
    url = server.url + "/v1/chat/completions"
    prompt = "the secret recipe is lavender"
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 5}
    response = requests.post(url, json=body, headers={**AUTH, HEADER: "plain-1"})
    usage = response.json()["usage"]
    line = line_of(access, "plain-1")
    assert set(line) == {
        "ts",
        "request_id",
        "key_id",
        "owner",
        "method",
        "path",
        "model",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
    }
    assert line["ts"].endswith("Z") and line["key_id"].startswith("key_")
    assert (line["status"], line["model"], line["path"]) == (200, "tiny", "/v1/chat/completions")
    assert line["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert line["completion_tokens"] == usage["completion_tokens"] > 0
    assert line["latency_ms"] > 0

    # A stream's line is written when it closes: with the tokens its usage chunk reported (a
    # line written with the headers would say 0).
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 6}
    with requests.post(url, json=stream, headers={**AUTH, HEADER: "stream-1"}, stream=True) as r:
        assert r.headers[HEADER] == "stream-1"
        events = [
            json.loads(raw[6:])
            for raw in r.iter_lines()
            if raw.startswith(b"data: ") and raw != b"data: [DONE]"
        ]
    streamed = events[-1]["usage"]
    line = line_of(access, "stream-1")
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        streamed["prompt_tokens"],
        streamed["completion_tokens"],
    )
    assert line["completion_tokens"] > 0 and line["status"] == 200
    assert len([x for x in access_lines(access) if x["request_id"] == "plain-1"]) == 1
    # Privacy by default: no prompt, no completion, no key anywhere in what was logged.
    texts = [r.getMessage() for r in access.records] + [access.text]
    assert not [t for t in texts if "lavender" in t]
    no_secret_in(texts)


@pytest.mark.integration
def test_an_engine_failure_names_the_request(server, access):
    engine = server.state.engines["tiny"]

    def broken() -> None:
        raise RuntimeError("injected")

    engine._advance = broken  # the worker's next turn raises: every job in it fails
    try:
        response = requests.post(
            server.url + "/v1/completions",
            json={"model": "tiny", "prompt": "x", "max_tokens": 3},
            headers={**AUTH, HEADER: "doomed-7"},
        )
    finally:
        del engine._advance
    assert response.status_code == 500 and response.headers[HEADER] == "doomed-7"
    named = [
        r
        for r in access.records
        if r.name == "lmref.serving.engine" and "doomed-7" in r.getMessage()
    ]
    assert named and named[0].levelno == logging.ERROR, [r.getMessage() for r in access.records]
    assert line_of(access, "doomed-7")["status"] == 500


@pytest.mark.integration
def test_log_prompts_flag_and_the_command_lines_stdout(tiny_model_dir):
    """``python -m lmref.serve``: access lines on stdout as bare JSON, the prompt only with
    --log-prompts, the key in no line of the process's output."""
    from lmref.lab.servers import start_replica

    for flag, logged in (([], False), (["--log-prompts"], True)):
        replica = start_replica(
            f"tiny={tiny_model_dir}",
            ["--api-key", KEY, "--torch-threads", "1", *flag],
            timeout=120,
        )
        try:
            body = {"model": "tiny", "prompt": "violet umbrella", "max_tokens": 2}
            response = requests.post(
                replica.url + "/v1/completions", json=body, headers={**AUTH, HEADER: "cli-1"}
            )
            assert response.status_code == 200

            def lines(replica=replica) -> list[dict]:
                return [
                    json.loads(x)
                    for x in list(replica.output)
                    if x.startswith("{") and '"request_id": "cli-1"' in x
                ]

            (line,) = wait_for(lines)
            assert line["completion_tokens"] == response.json()["usage"]["completion_tokens"]
            assert ("prompt" in line) is logged and (
                line.get("prompt") == "violet umbrella"
            ) is logged
            no_secret_in(list(replica.output))
        finally:
            replica.stop()


# --------------------------------------------------------------- Batch: worker log and error file
needs_servers = pytest.mark.skipif(
    not shutil.which("redis-server") or not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists(),
    reason="redis-server and rabbitmq-server come from Debian (make system)",
)


@needs_servers
@pytest.mark.integration
def test_a_batch_line_is_found_in_its_workers_log(tiny_model_dir, tmp_path):
    pytest.importorskip("celery")
    openai = pytest.importorskip("openai")
    from lmref.lab.servers import start_celery_worker, start_rabbitmq, start_redis
    from lmref.lab.services import Services
    from lmref.production.worker import READY_LINE
    from lmref.serve import SharedServices, build_app
    from lmref.serving.server import start_in_thread

    with Services() as services:
        rabbit = services.add(start_rabbitmq())
        store = services.add(start_redis())
        env = {
            "LMREF_BROKER_URL": rabbit.url,
            "LMREF_STORE_URL": store.url,
            "LMREF_WORKER_MODELS": f"tiny={tiny_model_dir}",
        }
        worker = services.add(start_celery_worker("lmref.production.celery_worker", "a1", env))
        config = ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[KEY])
        shared = SharedServices(broker_url=rabbit.url, store_url=store.url, sweep_interval_s=0)
        handle = start_in_thread(build_app(config, shared), config, port=0)
        try:
            worker.wait_for_text(READY_LINE, timeout=120)
            client = openai.OpenAI(base_url=handle.url + "/v1", api_key=KEY, max_retries=0)
            good = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "a"}],
                "max_tokens": 2,
            }
            lines = [
                {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions", "body": good},
                {
                    "custom_id": "bad",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {**good, "max_tokens": -1},  # a 400: the error file
                },
            ]
            path = tmp_path / "requests.jsonl"
            path.write_text("".join(json.dumps(x) + "\n" for x in lines))
            uploaded = client.files.create(file=path.open("rb"), purpose="batch")
            batch = client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                extra_headers={HEADER: "batch-origin-9"},
            )
            done = wait_for(
                lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b, 90
            )
            files = (done.error_file_id, done.output_file_id)
            error, output = (json.loads(client.files.content(f).text) for f in files)
            for line in (error, output):
                rid = line["response"]["request_id"]
                assert rid.startswith("req_") and SAFE_ID.fullmatch(rid)
                logged = wait_for(lambda rid=rid: [x for x in worker.output if rid in x], 10)
                assert "batch-origin-9" in logged[0] and line["custom_id"] in logged[0], logged
            assert error["response"]["status_code"] == 400
            no_secret_in(list(worker.output))
        finally:
            handle.stop(drain_timeout=5)
