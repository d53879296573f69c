"""The model server against real servers on 127.0.0.1: the openai client, raw HTTP, SIGTERM.

Servers run waitress in a thread of this process (``start_server``), one as a child process
(``python -m lmref.serve``) for SIGTERM. All use the conftest's tiny random Llama.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import re
import signal
import socket
import threading
import time

import openai
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmref.core.manifest import write_manifest
from lmref.lab.loadtest import run_load, spawn_server
from lmref.serve import start_server
from lmref.serving.app import ModelSpec, ServingConfig, create_app

pytestmark = pytest.mark.integration  # servers in threads and child processes

KEY = "test-key-123"
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """Auth on, two versions and a 50/50 alias, cache off (so every answer is generated)."""
    config = ServingConfig(
        models=[
            ModelSpec("tiny", str(tiny_model_dir), max_batch_size=32, max_queue_size=512),
            ModelSpec("tiny-b", str(tiny_model_dir)),
        ],
        aliases={"ab": {"tiny": 1.0, "tiny-b": 1.0}},
        api_keys=[KEY],
        cache_size=0,
        server_threads=96,
        torch_threads=1,
    )  # 1 thread: this shared machine is oversubscribed
    handle = start_server(config)
    yield handle
    handle.stop(drain_timeout=5)


@pytest.fixture(scope="module")
def small_server(tiny_model_dir):
    """No auth, cache on, no batching, a 2-row queue, small limits: backpressure and fuzzing."""
    config = ServingConfig(
        models=[ModelSpec("tiny", str(tiny_model_dir), max_batch_size=1, max_queue_size=2)],
        api_keys=[],
        max_tokens_limit=48,
        default_max_tokens=4,
        max_content_length=4096,
        torch_threads=1,
    )
    handle = start_server(config)
    yield handle
    handle.stop(drain_timeout=5)


# A template that raises on some messages, as real ones do (roles must alternate).
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant/user/...') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>\n"
)


@pytest.fixture(scope="module")
def scripted_server(scripted_model_dir):
    """The crafted model twice: as is, and with ALTERNATING and a long batch window (so requests
    sent together share a batch)."""
    config = ServingConfig(
        models=[
            ModelSpec("scripted", str(scripted_model_dir)),
            ModelSpec(
                "alternating",
                str(scripted_model_dir),
                max_batch_size=8,
                batch_wait_ms=1000,
                chat_template=ALTERNATING,
            ),
        ],
        api_keys=[],
        cache_size=0,
        torch_threads=1,
    )
    handle = start_server(config)
    yield handle
    handle.stop(drain_timeout=5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Unbatched greedy generation with transformers' own generate(), one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def greedy(prompt: str, max_tokens: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.decode(
            out[0, ids.input_ids.shape[1] :],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )

    return greedy


# Two prompts and the text a crafted model writes after each (greedy): the last character of
# "😀" and of "は" is several byte tokens of the tiny BPE, so a stop string ending in one spans
# tokens. The chains share no token (the model maps a token to its successor, whatever came before).
SCRIPTED = {"Say:": "ok😀done", "Run": "xyは!"}


@pytest.fixture(scope="module")
def scripted_model_dir(tiny_tokenizer, tmp_path_factory):
    """A real 1-layer Llama whose weights make it write SCRIPTED[prompt] and then EOS: attention
    and MLP outputs are zeroed (each layer passes its input through), and the output head maps
    each token's embedding to the next token of its chain."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    successor = {}
    for prompt, text in SCRIPTED.items():
        chain = [
            tiny_tokenizer.encode(prompt)[-1],
            *tiny_tokenizer.encode(text),
            tiny_tokenizer.eos_token_id,
        ]
        for a, b in zip(chain, chain[1:]):
            assert successor.setdefault(a, b) == b, "the chains must not share a token"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for a, b in successor.items():
            model.lm_head.weight[b] += 10 * emb[a] / emb[a].norm()  # EOS: two predecessors
    path = tmp_path_factory.mktemp("scripted-llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    write_manifest(path)
    return path


def metric(url: str, name: str, **labels) -> float:
    """Sum of the samples of one Prometheus metric matching the labels."""
    total = 0.0
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"^([^{\s]+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def raw_http(url: str, data: bytes, timeout: float = 10) -> tuple[int, str, bytes]:
    """Send raw bytes (no client library fixing them up); status, content type, body."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.getheader("Content-Type", ""), response.read()


def sse_events(response: requests.Response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            data = line[6:].decode()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def post(url: str, path: str, body, key: str | None = KEY, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + path, json=body, headers=headers, timeout=60, **kwargs)


# ------------------------------------------------------------------ completions and chat
def test_completion_plain_and_streamed_agree(client):
    plain = client.completions.create(
        model="tiny", prompt="Return the value", max_tokens=12, temperature=0
    )
    choice = plain.choices[0]
    assert plain.id.startswith("cmpl-") and plain.model == "tiny"
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    if choice.finish_reason == "length":
        assert plain.usage.completion_tokens == 12

    chunks = list(
        client.completions.create(
            model="tiny", prompt="Return the value", max_tokens=12, temperature=0, stream=True
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


def test_stream_usage_chunk_and_done(server):
    body = {
        "model": "tiny",
        "prompt": "Split the string",
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with post(server.url, "/v1/completions", body, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert all(e["usage"] is None for e in events[:-2])
    assert len({e["id"] for e in events[:-1]}) == 1


def test_chat_plain_and_streamed(client):
    messages = [
        {"role": "system", "content": "You answer."},
        {"role": "user", "content": "Return the value"},
    ]
    plain = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    assert plain.id.startswith("chatcmpl-") and plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])  # role only in the first
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_prompt_list_gives_one_choice_each(client, reference):
    prompts = ["Return a list", "Split the string at"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [reference(p, 5) for p in prompts]


def test_same_seed_same_text(client):
    def sample(seed):
        return (
            client.completions.create(
                model="tiny",
                prompt="The object",
                max_tokens=16,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
            )
            .choices[0]
            .text
        )

    with cf.ThreadPoolExecutor(4) as pool:  # also while other requests share the batch
        texts = list(pool.map(sample, [7, 7, 7, 8]))
    assert texts[0] == texts[1] == texts[2]
    assert texts[3] != texts[0]


def test_stop_strings_never_leak(client):
    full = (
        client.completions.create(model="tiny", prompt="Return the", max_tokens=30, temperature=0)
        .choices[0]
        .text
    )
    assert len(full) > 12
    stop = full[6:10]  # tokens of this tiny BPE are a few characters: the stop spans tokens
    expected = full[: full.find(stop)]
    plain = client.completions.create(
        model="tiny", prompt="Return the", max_tokens=30, temperature=0, stop=[stop, "\x00never"]
    )
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="tiny", prompt="Return the", max_tokens=30, temperature=0, stop=stop, stream=True
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == expected and stop not in streamed
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "prompt, stop, expected",
    [("Say:", "😀", "ok"), ("Say:", "k😀", "o"), ("Run", "yは", "x"), ("Run", "は!", "xy")],
)
def test_stop_string_ending_in_a_split_character(scripted_server, prompt, stop, expected):
    client = openai.OpenAI(
        base_url=scripted_server.url + "/v1", api_key="-", max_retries=0, timeout=60
    )
    request = {"model": "scripted", "prompt": prompt, "max_tokens": 20, "temperature": 0}
    assert client.completions.create(**request).choices[0].text == SCRIPTED[prompt]
    plain = client.completions.create(**request, stop=[stop]).choices[0]
    assert (plain.text, plain.finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(**request, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_template_error_is_a_400_for_that_request_only(scripted_server):
    url = scripted_server.url
    good = [{"role": "user", "content": "Say:"}]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    batches = metric(url, "lmref:batch_size_count", model_name="alternating")
    rows = metric(url, "lmref:batch_size_sum", model_name="alternating")

    def one(messages):
        return post(
            url,
            "/v1/chat/completions",
            {"model": "alternating", "messages": messages, "max_tokens": 4, "temperature": 0},
            key=None,
        )

    with cf.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, [good, bad, good, good]))
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    error = responses[1].json()["error"]
    assert error["param"] == "messages" and "alternate" in error["message"]
    # the four shared one batch: the bad one left it, the others were generated together
    assert metric(url, "lmref:batch_size_count", model_name="alternating") == batches + 1
    assert metric(url, "lmref:batch_size_sum", model_name="alternating") == rows + 3


def test_body_over_the_limit_is_refused_before_it_is_read(server):
    # 50 MB announced, one byte sent, no key: answered at once (not after reading, not 401)
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\n\r\n{"
    )
    status, kind, body = raw_http(server.url, head)
    assert status == 413 and kind == "application/json"
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_errors_below_flask_are_openai_json(server):
    big_header = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n"
    bad_chunks = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    )
    for raw, expected in ((big_header, 431), (bad_chunks, 400)):
        status, kind, body = raw_http(server.url, raw)
        assert status == expected and kind == "application/json"
        assert set(json.loads(body)["error"]) == ERROR_FIELDS


def test_model_by_id(client):
    assert client.models.retrieve("tiny").id == "tiny"
    assert client.models.retrieve("ab").id == "ab"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_without_max_tokens_runs_to_the_context(client):
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 256  # the context length
    plain = client.completions.create(
        model="tiny", prompt="x", temperature=0, extra_body={"ignore_eos": True}
    )
    assert plain.usage.completion_tokens == 16  # completions keep OpenAI's default


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "field, value",
    [
        ("functions", [{"name": "f"}]),  # tools on chat: tests/test_tool_calls.py
        ("response_format", {"type": "grammar"}),  # json_object: tests/test_structured_output.py
        ("suffix", "end"),
    ],
)
def test_unimplemented_fields_are_400_naming_them(server, path, field, value):
    body = {
        "model": "tiny",
        "prompt": "x",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2,
    }
    r = post(server.url, path, {**body, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert field in r.json()["error"]["message"]
    unused = {
        "functions": [],
        "response_format": {"type": "text"},
        "suffix": "",
    }[field]
    assert post(server.url, path, {**body, field: unused}).status_code == 200  # lm-eval sends these


def test_n_choices(client):
    def sample():
        return client.completions.create(
            model="tiny", prompt=["a", "b"], n=2, max_tokens=8, temperature=1.0, seed=3
        )

    first = sample()
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    texts = [c.text for c in first.choices]
    assert texts[0] != texts[1] and texts[2] != texts[3]  # each choice its own sample
    assert [c.text for c in sample().choices] == texts  # seeded: the same again
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], n=3, max_tokens=6, temperature=0
    )
    assert len({c.message.content for c in chat.choices}) == 1 and len(chat.choices) == 3
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            n=2,
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    finished = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert finished == {0, 1}
    with pytest.raises(openai.BadRequestError) as info:  # more rows than the queue could hold
        client.completions.create(model="tiny-b", prompt=["a"] * 20, n=16, max_tokens=1)
    assert info.value.body["param"] == "n"


def test_predict_and_models(server):
    r = post(server.url, "/predict", {"prompt": "Return the"})
    assert r.status_code == 200 and r.json()["finish_reason"] in ("stop", "length")
    assert isinstance(r.json()["completion"], str) and r.json()["model"] == "tiny"
    models = requests.get(
        server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).json()
    ids = {m["id"] for m in models["data"]}
    assert {"tiny", "tiny-b", "ab"} <= ids


def test_ab_alias_names_the_version(client):
    seen = {
        client.completions.create(model="ab", prompt="x", max_tokens=1).model for _ in range(24)
    }
    assert seen == {"tiny", "tiny-b"}
    sticky = {
        client.completions.create(model="ab", prompt="x", max_tokens=1, user="alice").model
        for _ in range(6)
    }
    assert len(sticky) == 1


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "9"}, "max_tokens"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x " * 10, "max_tokens": 250}, "max_tokens"),  # prompt + max_tokens > 256
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_fields_are_400(server, body, param):
    r = post(server.url, "/v1/completions", {"model": "tiny", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_FIELDS and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_bad_fields_through_openai_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x")
    assert info.value.body["code"] == "model_not_found"


def test_malformed_json_wrong_type_and_too_large(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw in (b"{not json", b"[1, 2]", b'{"prompt": NaN}', b"\xff\xfe"):
        r = requests.post(server.url + "/v1/completions", data=raw, headers=headers, timeout=10)
        assert r.status_code == 400 and set(r.json()["error"]) == ERROR_FIELDS
    r = requests.post(
        server.url + "/v1/completions",
        data="prompt=x",
        timeout=10,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = post(server.url, "/v1/completions", {"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and set(r.json()["error"]) == ERROR_FIELDS


def test_unknown_route_and_method(server):
    r = requests.get(
        server.url + "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.get(
        server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert r.status_code == 405 and set(r.json()["error"]) == ERROR_FIELDS


def test_auth_required_but_health_and_metrics_public(server):
    for key in (None, "wrong-key", ""):
        r = post(server.url, "/v1/completions", {"prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "Traceback" not in r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    for path in ("/health", "/ready", "/metrics"):
        assert requests.get(server.url + path, timeout=10).status_code == 200


def test_not_loaded_is_503(tiny_model_dir, tmp_path):
    app = create_app(
        ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[]), start=False
    )  # workers not started: the state while weights load
    web = app.test_client()
    assert web.get("/health").status_code == 200
    assert web.get("/ready").status_code == 503
    r = web.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json["error"]["code"] == "model_loading"
    assert "Retry-After" in r.headers
    broken = start_server(
        ServingConfig(models=[ModelSpec("gone", str(tmp_path))], api_keys=[]), wait=False
    )
    try:
        broken.state.engines["gone"].loaded.wait(30)
        assert requests.get(broken.url + "/ready", timeout=10).status_code == 503
        r = post(broken.url, "/v1/completions", {"prompt": "x"}, key=None)
        assert r.status_code == 503 and "Traceback" not in r.text
    finally:
        broken.stop(drain_timeout=1)


def test_queue_full_is_429_with_retry_after(small_server):
    def one(i):
        return post(
            small_server.url,
            "/v1/completions",
            {"prompt": f"request {i}", "max_tokens": 48, "temperature": 0, "ignore_eos": True},
            key=None,
        )

    with cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1
    rejected = next(r for r in responses if r.status_code == 429)
    assert (
        rejected.headers["Retry-After"] and rejected.json()["error"]["type"] == "rate_limit_error"
    )
    # the queue drains: the server takes work again
    assert one(99).status_code == 200


def test_cache_hits_for_greedy_requests(small_server):
    body = {"prompt": "cache me", "max_tokens": 8, "temperature": 0}
    hits = metric(small_server.url, "lmref:response_cache_hits_total")
    misses = metric(small_server.url, "lmref:response_cache_misses_total")
    first = post(small_server.url, "/v1/completions", body, key=None).json()
    second = post(small_server.url, "/v1/completions", body, key=None).json()
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]
    assert metric(small_server.url, "lmref:response_cache_hits_total") == hits + 1
    assert metric(small_server.url, "lmref:response_cache_misses_total") == misses + 1
    with post(
        small_server.url, "/v1/completions", {**body, "stream": True}, key=None, stream=True
    ) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == first["choices"][0]["text"]
    post(small_server.url, "/v1/completions", {**body, "temperature": 0.7}, key=None)
    assert metric(small_server.url, "lmref:response_cache_hits_total") == hits + 2


# ------------------------------------------------------------------ batching and load
def test_200_concurrent_requests_match_unbatched_greedy(server, reference):
    prompts = [
        f"Item {i}: return the {['list', 'value', 'string', 'name'][i % 4]} of" for i in range(200)
    ]
    batches = metric(server.url, "lmref:batch_size_count", model_name="tiny")
    rows = metric(server.url, "lmref:batch_size_sum", model_name="tiny")
    session = threading.local()

    def one(prompt):
        s = getattr(session, "s", None) or requests.Session()
        session.s = s
        r = s.post(
            server.url + "/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        return r.status_code, r.json()

    with cf.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, prompts))
    assert [code for code, _ in results] == [200] * 200
    texts = [body["choices"][0]["text"] for _, body in results]
    assert texts == [reference(p, 8) for p in prompts]
    batches = metric(server.url, "lmref:batch_size_count", model_name="tiny") - batches
    rows = metric(server.url, "lmref:batch_size_sum", model_name="tiny") - rows
    assert rows == 200 and batches < 100  # requests really shared forward passes


def test_metrics_move_after_traffic(server, client):
    def snapshot():
        return {
            "ok": metric(
                server.url, "lmref:http_requests_total", endpoint="/v1/completions", status="200"
            ),
            "gen": metric(server.url, "lmref:generation_tokens_total", model_name="tiny"),
            "prompt": metric(server.url, "lmref:prompt_tokens_total", model_name="tiny"),
            "ttft": metric(
                server.url, "lmref:time_to_first_token_seconds_count", model_name="tiny"
            ),
            "itl": metric(server.url, "lmref:inter_token_latency_seconds_count", model_name="tiny"),
            "e2e": metric(server.url, "lmref:e2e_request_latency_seconds_count", model_name="tiny"),
            "401": metric(server.url, "lmref:http_requests_total", status="401"),
        }

    before = snapshot()
    client.completions.create(
        model="tiny", prompt="Count", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    post(server.url, "/v1/completions", {"prompt": "x"}, key="bad")
    after = snapshot()
    assert after["ok"] == before["ok"] + 1 and after["gen"] == before["gen"] + 5
    assert after["prompt"] > before["prompt"] and after["ttft"] == before["ttft"] + 1
    assert after["itl"] == before["itl"] + 4 and after["e2e"] == before["e2e"] + 1
    assert after["401"] == before["401"] + 1
    text = requests.get(server.url + "/metrics", timeout=10).text
    for name in ("lmref:num_requests_running", "lmref:num_requests_waiting", "lmref:batch_size"):
        assert name in text


def test_client_disconnect_frees_its_slot(server):
    aborted = metric(server.url, "lmref:request_success_total", finished_reason="abort")
    body = {
        "model": "tiny-b",
        "prompt": "go on",
        "max_tokens": 240,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    r = post(server.url, "/v1/completions", body, stream=True)
    next(r.iter_lines())  # the stream started
    r.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if metric(server.url, "lmref:request_success_total", finished_reason="abort") > aborted:
            break
        time.sleep(0.05)
    assert metric(server.url, "lmref:request_success_total", finished_reason="abort") == aborted + 1
    assert metric(server.url, "lmref:num_requests_running", model_name="tiny-b") == 0


def test_load_generator_reports_percentiles(small_server):
    result = run_load(small_server.url, [f"p{i}" for i in range(6)], concurrency=2, max_tokens=4)
    assert result["requests"] == 6 and result["failed"] == 0
    assert result["output_tokens_per_s"] > 0 and result["e2e_p99_ms"] >= result["e2e_p50_ms"] > 0


# ------------------------------------------------------------------ fuzzing
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=20)}
)
VALID = st.fixed_dictionaries(
    {  # bodies both endpoints accept (prompt for one, messages for other)
        "model": st.just("tiny"),
        "prompt": st.text(max_size=30),
        "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    },
    optional={
        "max_tokens": st.integers(1, 6),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
        "seed": st.integers(0, 2**64 - 1),
        "stream": st.booleans(),
        "user": st.text(max_size=5),
        "ignore_eos": st.booleans(),
    },
)
FIELD_NAMES = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "user",
    "ignore_eos",
    "max_completion_tokens",
]
# A valid body, or one with one field replaced by any JSON value (most of those are 400s).
BODIES = VALID | st.builds(
    lambda body, name, value: {**body, name: value}, VALID, st.sampled_from(FIELD_NAMES), JSON
)


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/predict"]))
def test_fuzzed_json_never_5xx(small_server, body, path):
    r = requests.post(small_server.url + path, json=body, timeout=60)
    event(f"status {r.status_code}")
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == ERROR_FIELDS
    elif body.get("stream") is True and path != "/predict":
        assert r.text.rstrip().endswith("data: [DONE]")


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes_never_5xx(small_server, raw):
    r = requests.post(
        small_server.url + "/v1/completions",
        data=raw,
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code < 500 and "Traceback" not in r.text


# ------------------------------------------------------------------ shutdown
def test_error_after_stream_start_is_an_event(tiny_model_dir):
    handle = start_server(
        ServingConfig(models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[])
    )
    body = {"prompt": "go", "max_tokens": 250, "temperature": 0, "ignore_eos": True, "stream": True}
    with requests.post(handle.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")
        stopper = threading.Thread(target=handle.stop, kwargs={"drain_timeout": 0})
        stopper.start()  # no time to drain: the running stream is aborted
        rest = [line for line in lines if line]
    stopper.join(15)
    assert rest[-1] == b"data: [DONE]"
    error = json.loads(rest[-2][6:])
    assert set(error["error"]) == ERROR_FIELDS and error["error"]["code"] == "shutting_down"


def test_sigterm_drains_in_flight_requests(tiny_model_dir):
    REQUESTS, QUEUED = 48, 16  # noqa: N806
    server = spawn_server(
        [
            "--model",
            f"tiny={tiny_model_dir}",
            "--max-batch-size",
            "1",
            "--torch-threads",
            "1",
            "--drain-timeout",
            "60",
        ],
        env={"LMREF_API_KEYS": ""},
        module="lmref.serve",
    )
    try:

        def one(i):
            return post(
                server.url,
                "/v1/completions",
                {"prompt": f"drain {i}", "max_tokens": 240, "temperature": 0, "ignore_eos": True},
                key=None,
            )

        # One at a time, 240 tokens each: the signal comes with at least 16 requests queued, a
        # drain of thousands of steps. The tiny model steps in about 0.1 ms here, so the late
        # request is sent as soon as /ready says the drain began, not after a fixed sleep (one of
        # 0.2 s once outlasted the whole drain, and 6 x 240 tokens once ended before /ready was
        # first read after the signal). Not all 48 queued at once: the server finished the first
        # ones while the last were sent, and waiting for 23 of 24 once waited out its 30 s.
        pool = cf.ThreadPoolExecutor(REQUESTS)
        futures = [pool.submit(one, i) for i in range(REQUESTS)]
        deadline = time.monotonic() + 30
        while metric(server.url, "lmref:num_requests_waiting") < QUEUED:
            assert time.monotonic() < deadline, f"{QUEUED} requests never queued at once"
            time.sleep(0.002)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while requests.get(server.url + "/ready", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/ready still 200 10 s after SIGTERM"
            time.sleep(0.002)
        late = post(server.url, "/v1/completions", {"prompt": "late"}, key=None)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        done = [f.result(timeout=60) for f in futures]
        pool.shutdown()
        assert [r.status_code for r in done] == [200] * REQUESTS
        assert all(r.json()["usage"]["completion_tokens"] == 240 for r in done)
        assert server.proc.wait(30) == 0
        assert any('"drained": true' in line for line in server.output)
        assert any("NO API KEYS" in line for line in server.output)  # said loudly at start
    finally:
        server.stop()
