"""The tokenizer routes (``/tokenize``, ``/detokenize``, ``/tokenizer_info``), penalties and
``logit_bias``, and echo on a stream, on one real server (127.0.0.1, the conftest's tiny Llama,
an API key), checked against the tokenizer and model loaded here; lm-evaluation-harness's own
remote tokenizer (``tokenizer_backend=remote``) talks to the routes.
"""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import requests
import torch

from lmref.serve import start_server
from lmref.serving.app import ModelSpec, ServingConfig

pytestmark = pytest.mark.integration  # a server on 127.0.0.1
KEY = "tok-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Return a new list containing"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    spec = ModelSpec("tiny", str(tiny_model_dir), prefill_chunk_tokens=3, batch_wait_ms=200)
    handle = start_server(
        ServingConfig(models=[spec], api_keys=[KEY], cache_size=0, torch_threads=1)
    )
    yield handle
    handle.stop(drain_timeout=5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def post(server, path: str, body: dict, headers=AUTH) -> requests.Response:
    return requests.post(server.url + path, json=body, headers=headers, timeout=30)


def test_tokenize_and_detokenize_agree_with_the_tokenizer(server, client, direct):
    _, tokenizer = direct
    r = post(server, "/tokenize", {"model": "tiny", "prompt": PROMPT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tokenizer(PROMPT)["input_ids"]
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    assert body["max_model_len"] > len(ids)
    back = post(server, "/detokenize", {"model": "tiny", "tokens": ids}).json()
    assert back == {"prompt": tokenizer.decode(ids)}
    # A chat prompt counts what a chat request is charged for.
    messages = [{"role": "user", "content": "Format the date"}]
    counted = post(server, "/tokenize", {"messages": messages}).json()["count"]  # default model
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert counted == reply.usage.prompt_tokens
    shorter = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert shorter.json()["count"] < counted


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        (
            "/tokenize",
            {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
            400,
            "prompt",
        ),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, 400, "add_special_tokens"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
        ("/detokenize", {"tokens": [True]}, 400, "tokens"),
    ],
)
def test_bad_tokenizer_requests_name_the_field(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    if status == 404:
        assert r.json()["error"]["code"] == "model_not_found"


def test_tokenizer_routes_need_a_key(server):
    assert post(server, "/tokenize", {"prompt": "x"}, headers={}).status_code == 401
    assert requests.get(server.url + "/tokenizer_info", timeout=30).status_code == 401


def test_lm_eval_remote_tokenizer_uses_the_routes(server, direct):
    """lm-eval's ``tokenizer_backend=remote`` (and its auto-detection) on these routes."""
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    _, tokenizer = direct
    url = server.url + "/v1/completions"
    assert check_remote_tokenizer_support(url, auth_token=KEY)
    assert not check_remote_tokenizer_support(url, max_retries=1)  # no key: not usable
    remote = RemoteTokenizer(url, auth_token=KEY)
    assert remote.encode(PROMPT) == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert remote.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer(PROMPT)["input_ids"]
    assert remote.decode(ids) == tokenizer.decode(ids)


def greedy_with(model, ids, steps, presence=0.0, frequency=0.0, bias=None) -> list[int]:
    """The hand computation: greedy decoding over OpenAI's adjusted logits."""
    ids, out, counts = list(ids), [], torch.zeros(model.config.vocab_size)
    for _ in range(steps):
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        logits = logits - presence * (counts > 0) - frequency * counts
        for token, value in (bias or {}).items():
            logits[token] += value
        token = int(logits.argmax())
        counts[token] += 1
        ids.append(token)
        out.append(token)
    return out


def test_penalties_and_logit_bias_match_a_hand_computation_in_a_mixed_batch(client, direct):
    model, tokenizer = direct
    ids = tokenizer(PROMPT)["input_ids"]
    plain_ids = greedy_with(model, ids, 8)
    banned = plain_ids[0]
    settings = dict(presence=0.7, frequency=1.3, bias={banned: -100.0, 7: 3.0})
    expected = greedy_with(model, ids, 8, **settings)
    assert expected != plain_ids  # the adjustment changes the text: the test can fail
    fields = {
        "presence_penalty": 0.7,
        "frequency_penalty": 1.3,
        "logit_bias": {str(banned): -100, "7": 3},
    }

    def ask(extra: dict):
        reply = client.completions.create(
            model="tiny",
            prompt=ids,
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True, **extra},
        )
        return reply.choices[0].text

    # Both at once (batch_wait_ms gathers them into one batch): each row keeps its own.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        adjusted, plain = pool.map(ask, [fields, {}])
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert plain == decode(plain_ids) and adjusted == decode(expected) and adjusted != plain


def test_echo_streams_the_prompt_first_with_its_logprobs(client, direct):
    """Prompt logprobs come from the prefill (3-token chunks here), equal to a direct pass."""
    model, tokenizer = direct
    kwargs = dict(
        model="tiny",
        prompt=PROMPT,
        max_tokens=4,
        echo=True,
        logprobs=1,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    plain = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert chunks[0].text == PROMPT
    assert "".join(chunks[0].logprobs.tokens) == PROMPT
    assert chunks[0].logprobs.token_logprobs[0] is None
    assert "".join(c.text for c in chunks) == plain.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert tokens == plain.logprobs.tokens and offsets == plain.logprobs.text_offset
    assert values[1:] == pytest.approx(plain.logprobs.token_logprobs[1:], abs=1e-5)
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        rows = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    wanted = [float(rows[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert plain.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(wanted, abs=1e-4)
    only = list(client.completions.create(**{**kwargs, "max_tokens": 0}, stream=True))
    assert "".join(c.choices[0].text for c in only if c.choices) == PROMPT
