"""API keys as records (lmref.production.keys, .limits, .key_api; python -m lmref.keys) against a
real Redis and two real replicas (``python -m lmref.serve --key-store-url``): scopes, a rate limit
and a token quota enforced across replicas (429, Retry-After, OpenAI's shape through the official
client), usage per key, revocation and rotation seen by both replicas within a second, the CLI,
fail-closed on a dead store, and no secret in Redis or in any line the servers and CLI print."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import time

import pytest
import requests

pytest.importorskip("redis")
openai = pytest.importorskip("openai")

from lmref.lab.servers import start_redis, start_replica  # noqa: E402
from lmref.lab.services import Services, free_port  # noqa: E402
from lmref.production.keys import PREFIX, KeyStore  # noqa: E402
from lmref.production.limits import Limiter  # noqa: E402
from lmref.serving.schema import APIError  # noqa: E402

needs_redis = pytest.mark.skipif(
    not shutil.which("redis-server"), reason="redis-server comes from Debian (make system)"
)
SECRETS: list[str] = []  # every secret made here: none may appear in Redis or in a log line


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    """(Redis, [replica, replica], KeyStore): two replicas on one key store."""
    with Services() as services:
        redis_ = services.add(start_redis())
        args = ["--key-store-url", redis_.url, "--torch-threads", "1"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both load at once
            starting = [
                pool.submit(start_replica, f"tiny={tiny_model_dir}", args, {"LMREF_API_KEYS": ""})
                for _ in range(2)
            ]
            replicas = [services.add(f.result()) for f in starting]
        yield redis_, replicas, KeyStore(redis_.url)


def new_key(store: KeyStore, owner: str, **kw) -> tuple[str, str]:
    record, secret = store.create(owner, **kw)
    SECRETS.append(secret)
    return record.key_id, secret


def client(replica, secret: str):
    return openai.OpenAI(base_url=replica.url + "/v1", api_key=secret, max_retries=0)


def complete(replica, secret: str, **kw):
    body = {"model": "tiny", "prompt": "def f(", "max_tokens": 6, "temperature": 1.0, **kw}
    return client(replica, secret).completions.create(**body)


def status(replica, secret: str, path: str = "/v1/models") -> int:
    headers = {"Authorization": f"Bearer {secret}"}
    return requests.get(replica.url + path, headers=headers, timeout=10).status_code


def assert_no_secret_leaked(redis_, replicas, *texts: str) -> None:
    """No secret made so far in Redis (every key and value) nor in any line the servers (and
    ``texts``: a CLI's stderr) printed; not even the random part of one."""
    store = KeyStore(redis_.url).redis
    dumped = []
    for key in store.scan_iter():
        dumped.append(key.decode())
        kind = store.type(key).decode()
        if kind == "hash":
            dumped += [f"{k.decode()}={v.decode()}" for k, v in store.hgetall(key).items()]
        elif kind == "set":
            dumped += [m.decode() for m in store.smembers(key)]
        else:
            dumped.append(store.get(key).decode())
    lines = [line for s in (redis_, *replicas) for line in s.output] + list(texts)
    assert dumped and lines
    for secret in SECRETS:
        body = secret.removeprefix(PREFIX)
        assert not [d for d in dumped if body in d], "a secret is stored in Redis"
        assert not [line for line in lines if body in line], "a secret is in a log line"


@needs_redis
@pytest.mark.integration
def test_scopes_and_no_secret_stored(cluster):
    redis_, replicas, store = cluster
    _, inference = new_key(store, "acme", scopes=["inference"])
    _, admin = new_key(store, "ops", scopes="admin")
    for replica in replicas:
        assert complete(replica, inference).choices[0].text is not None
        assert status(replica, inference, "/v1/admin/usage") == 403
        assert status(replica, inference, "/v1/batches") == 403
        assert status(replica, admin, "/v1/admin/usage") == 200
        assert status(replica, admin, "/v1/models") == 403  # admin only: no inference scope
        assert status(replica, "sk-lmref-not-a-key") == 401
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(replicas[0], inference).batches.list()
    assert denied.value.code == "insufficient_scope"
    listed = requests.get(
        replicas[1].url + "/v1/admin/keys", headers={"Authorization": f"Bearer {admin}"}, timeout=10
    ).json()["data"]
    assert {"acme", "ops"} <= {r["owner"] for r in listed}
    assert all(set(r) == set(listed[0]) and "secret" not in r for r in listed)
    assert_no_secret_leaked(redis_, replicas)


@needs_redis
@pytest.mark.integration
def test_a_limited_key_gets_429_on_both_replicas_while_another_is_served(cluster):
    redis_, replicas, store = cluster
    _, limited = new_key(store, "slow", rate_per_s=0.2)  # a burst of 1, then one per 5 s
    _, other = new_key(store, "fast", rate_per_s=50)
    assert complete(replicas[0], limited).choices
    for replica in replicas:  # the second request, on either replica, is over the limit
        with pytest.raises(openai.RateLimitError) as refused:
            complete(replica, limited)
        error = refused.value
        assert error.status_code == 429 and error.type == "rate_limit_error"
        assert error.code == "rate_limit_exceeded" and "retry after" in error.message
        assert 1 <= int(error.response.headers["Retry-After"]) <= 5
        assert complete(replica, other).choices  # another key is served meanwhile
    assert_no_secret_leaked(redis_, replicas)


@needs_redis
@pytest.mark.integration
def test_token_quota_refuses_once_spent(cluster):
    redis_, replicas, store = cluster
    key_id, secret = new_key(store, "small", tokens_per_min=10)
    spent = complete(replicas[0], secret, prompt="def spend(x):\n    return x\n" * 3)
    assert spent.usage.prompt_tokens > 10
    deadline = time.monotonic() + 3  # the charge lands when the response closes
    while True:
        try:
            complete(replicas[1], secret)
        except openai.RateLimitError as refused:
            error = refused
            break
        assert time.monotonic() < deadline, "the spent quota was never enforced"
        time.sleep(0.1)
    assert error.code == "token_quota_exceeded" and error.type == "rate_limit_error"
    # 10 tokens a minute (one per 6 s) and a debt of total - 10: one token is back after
    # (total - 10 + 1) * 6 s, less the second or so since the charge.
    due = (spent.usage.total_tokens - 10 + 1) * 6
    assert due - 3 <= int(error.response.headers["Retry-After"]) <= due
    assert Limiter(store.redis).usage(key_id)["refused"] >= 1


@needs_redis
@pytest.mark.integration
def test_usage_per_key_matches_what_the_responses_reported(cluster):
    redis_, replicas, store = cluster
    key_id, secret = new_key(store, "metered", scopes="inference")
    _, admin = new_key(store, "ops2", scopes="admin")
    reported = [complete(r, secret, max_tokens=5).usage for r in replicas]
    chat = client(replicas[0], secret).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    reported.append(chat.usage)
    stream = client(replicas[1], secret).completions.create(
        model="tiny",
        prompt="def g(",
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    reported.append([c for c in stream if c.usage][-1].usage)
    expected = {
        "requests": len(reported),
        "prompt_tokens": sum(u.prompt_tokens for u in reported),
        "completion_tokens": sum(u.completion_tokens for u in reported),
        "refused": 0,
    }
    deadline = time.monotonic() + 3
    while True:  # the last charge lands when the stream closes
        rows = requests.get(
            replicas[0].url + "/v1/admin/usage",
            headers={"Authorization": f"Bearer {admin}"},
            timeout=10,
        ).json()["data"]
        (row,) = [r for r in rows if r["key_id"] == key_id]
        if row["requests"] == expected["requests"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert row == {"key_id": key_id, "owner": "metered", "revoked": False, **expected}


def wait_refused(replicas, secret: str, timeout: float = 5.0) -> float:
    """Seconds until every replica refuses ``secret`` (401)."""
    start, pending = time.monotonic(), list(replicas)
    while pending and time.monotonic() - start < timeout:
        pending = [r for r in pending if status(r, secret) != 401]
        time.sleep(0.02)
    assert not pending, "a replica still lets the key in"
    return time.monotonic() - start


@needs_redis
@pytest.mark.integration
def test_revoked_and_rotated_keys_are_refused_by_both_replicas_within_a_second(cluster):
    redis_, replicas, store = cluster
    key_id, secret = new_key(store, "leaver")
    assert [status(r, secret) for r in replicas] == [200, 200]  # both have it cached now
    store.revoke(key_id)
    assert wait_refused(replicas, secret) < 1.0
    assert store.get(key_id).revoked

    key_id, old = new_key(store, "rotator", scopes="inference,batch", rate_per_s=100)
    assert [status(r, old) for r in replicas] == [200, 200]
    new = store.rotate(key_id)
    SECRETS.append(new)
    assert wait_refused(replicas, old) < 1.0
    assert [status(r, new) for r in replicas] == [200, 200]
    record = store.get(key_id)
    assert (record.owner, record.scopes, record.rate_per_s) == (
        "rotator",
        ("inference", "batch"),
        100,
    )
    assert_no_secret_leaked(redis_, replicas)


def run_cli(redis_, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "lmref.keys", "--store-url", redis_.url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (run.returncode == 0) == ok, run.stderr
    return run


@needs_redis
@pytest.mark.integration
def test_the_cli_creates_lists_rotates_and_revokes(cluster):
    redis_, replicas, store = cluster
    made = run_cli(redis_, "create", "--owner", "cli", "--scopes", "inference,batch",
                   "--rate-per-s", "20", "--tokens-per-min", "5000")  # fmt: skip
    key = json.loads(made.stdout)
    SECRETS.append(key["secret"])
    assert key["secret"].startswith(PREFIX) and key["scopes"] == ["inference", "batch"]
    assert (key["owner"], key["rate_per_s"], key["tokens_per_min"]) == ("cli", 20.0, 5000)
    assert status(replicas[0], key["secret"]) == 200
    listed = run_cli(redis_, "list")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert key["key_id"] in {r["key_id"] for r in rows}
    assert all("secret" not in r for r in rows) and PREFIX not in listed.stdout
    rotated = run_cli(redis_, "rotate", key["key_id"])
    new = json.loads(rotated.stdout)["secret"]
    SECRETS.append(new)
    assert wait_refused(replicas, key["secret"]) < 1.0 and status(replicas[1], new) == 200
    revoked = run_cli(redis_, "revoke", key["key_id"])
    assert json.loads(revoked.stdout)["revoked"] is True
    assert wait_refused(replicas, new) < 1.0
    bad = run_cli(redis_, "create", "--owner", "x", "--scopes", "inference,root", ok=False)
    assert "unknown scope 'root'" in bad.stderr and bad.returncode == 2
    missing = run_cli(redis_, "revoke", "key_nope", ok=False)
    assert "no key 'key_nope'" in missing.stderr
    stderr = [r.stderr for r in (made, listed, rotated, revoked, bad, missing)]
    assert_no_secret_leaked(redis_, replicas, *stderr)


@needs_redis
@pytest.mark.integration
def test_limiter_math_on_redis_clock():
    with Services() as services:
        store = KeyStore(services.add(start_redis()).url)
        limiter = Limiter(store.redis)
        record, _ = store.create("math", rate_per_s=4, tokens_per_min=120)
        who = record.principal()
        assert [limiter.check(who) for _ in range(4)] == [None] * 4  # burst: 4 (one second's)
        assert limiter.check(who) == ("rate_limit_exceeded", 1)
        time.sleep(0.3)  # 4/s: a request's worth (0.25 s) has come back
        assert limiter.check(who) is None
        limiter.charge(record.key_id, 120, prompt=100, completion=40)  # 120 - 140 = -20
        code, wait = limiter.check(who)  # back to 1 token at 2 tokens/s: about 10.5 s
        assert code == "token_quota_exceeded" and wait == 11
        assert limiter.usage(record.key_id) == {
            "requests": 1,
            "prompt_tokens": 100,
            "completion_tokens": 40,
            "refused": 2,
        }


@pytest.mark.unit
def test_a_dead_key_store_refuses_with_503_not_500(tiny_model_dir):
    """Fail closed: no Redis, no request in (a 503 in OpenAI's shape, for the client to retry)."""
    from lmref.production.key_api import register_key_store
    from lmref.serving.app import ModelSpec, ServingConfig, create_app

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(APIError) as raised:
        KeyStore(url, timeout_s=0.5).authenticate("sk-lmref-anything")
    assert raised.value.status == 503
    app = create_app(
        ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[]), start=False
    )
    register_key_store(app, url)
    answer = app.test_client().get("/v1/models", headers={"Authorization": "Bearer sk-x"})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert answer.json["error"]["code"] == "key_store_unavailable"
    assert app.test_client().get("/v1/models").status_code == 401  # no key: nothing to look up


@pytest.mark.unit
def test_a_key_store_and_static_keys_together_are_refused(tiny_model_dir, capsys):
    from lmref.serve import SharedServices, build_app, main
    from lmref.serving.app import ModelSpec, ServingConfig

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(SystemExit) as usage:
        main(["--model", f"tiny={tiny_model_dir}", "--key-store-url", url, "--api-key", "sk-a"])
    assert usage.value.code == 2
    assert "--key-store-url (LMREF_KEY_STORE_URL) replaces --api-key" in capsys.readouterr().err
    config = ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=["sk-a"])
    with pytest.raises(ValueError, match="replaces --api-key and LMREF_API_KEYS"):
        build_app(config, SharedServices(key_store_url=url))
