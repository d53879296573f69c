"""logprobs / top_logprobs / echo on a real server (127.0.0.1) through the official openai client,
checked against a direct forward pass of the same model computed here (the conftest's tiny Llama).
"""

from __future__ import annotations

import json

import openai
import pytest
import requests
import torch

from lmref.serve import start_server
from lmref.serving.app import ModelSpec, ServingConfig
from lmref.serving.engine import DEFAULT_CHAT_TEMPLATE

pytestmark = pytest.mark.integration  # a server on 127.0.0.1

PROMPT = "Return a new list containing"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = ServingConfig(
        models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[], cache_size=0, torch_threads=1
    )
    handle = start_server(config)
    yield handle
    handle.stop(drain_timeout=5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    """The model and tokenizer loaded here, and log-softmax rows of a direct forward pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:  # row i: distribution of token i + 1
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    def greedy(ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
        ids, rows = list(ids), []
        for _ in range(steps):
            row = logprobs(ids)[-1]
            rows.append(row)
            ids.append(int(row.argmax()))
        return ids[-steps:], rows

    return tokenizer, logprobs, greedy


def assert_close(got: float, want: float) -> None:
    assert got == pytest.approx(want, abs=2e-4), (got, want)


def test_chat_logprobs_match_a_direct_forward_pass(client, direct):
    tokenizer, _, greedy = direct
    messages = [{"role": "user", "content": "Sort the items"}]
    reply = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    text = tokenizer.apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    ids, rows = greedy(tokenizer(text)["input_ids"], 6)
    for entry, token, row in zip(content, ids, rows):
        assert_close(entry.logprob, float(row[token]))
        assert len(entry.top_logprobs) == 3
        values, top_ids = row.topk(3)
        for alt, value, alt_id in zip(entry.top_logprobs, values.tolist(), top_ids.tolist()):
            assert_close(alt.logprob, value)
            assert bytes(alt.bytes).decode("utf-8", "replace") == tokenizer.decode([alt_id])
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top
        assert bytes(entry.bytes).decode("utf-8", "replace") == tokenizer.decode([token])
    # The bytes of the tokens are the answer's text (ignore_eos: an EOS decodes to nothing).
    joined = b"".join(
        bytes(e.bytes) for e, t in zip(content, ids) if t != tokenizer.eos_token_id
    ).decode("utf-8", "replace")
    assert joined == reply.choices[0].message.content


def test_chat_without_logprobs_has_none(client):
    reply = client.chat.completions.create(
        model="tiny", max_tokens=2, temperature=0, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].logprobs is None


def test_echo_max_tokens_0_scores_the_prompt(client, direct):
    """What lm-evaluation-harness's local-completions sends to score a continuation."""
    tokenizer, logprobs, _ = direct
    ids = tokenizer(PROMPT)["input_ids"]
    reply = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    choice = reply.choices[0]
    assert choice.text == PROMPT and reply.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = logprobs(ids)
    for i in range(1, len(ids)):
        assert_close(lp.token_logprobs[i], float(rows[i - 1, ids[i]]))
        top = lp.top_logprobs[i]
        assert lp.tokens[i] in top and len(top) in (2, 3)  # 2 best + the prompt's own token
        assert_close(max(top.values()), float(rows[i - 1].max()))
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]


def test_echo_with_generation_and_token_id_prompts(client, direct):
    """lm-eval sends token ids, echo and max_tokens 1, and reads token_logprobs[ctxlen:-1]."""
    tokenizer, logprobs, greedy = direct
    ids = tokenizer(PROMPT)["input_ids"]
    other = tokenizer("Split the string")["input_ids"]
    reply = client.completions.create(
        model="tiny",
        prompt=[ids, other],
        max_tokens=3,
        echo=True,
        logprobs=1,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, prompt_ids in zip(reply.choices, [ids, other]):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(prompt_ids) + 3
        generated, rows = greedy(prompt_ids, 3)
        full = prompt_ids + generated
        reference = logprobs(full)
        for i in range(1, len(full)):
            assert_close(lp.token_logprobs[i], float(reference[i - 1, full[i]]))
        assert choice.text.startswith(tokenizer.decode(prompt_ids))
    by_string = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=3,
        echo=True,
        logprobs=1,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert by_string.choices[0].logprobs.tokens == reply.choices[0].logprobs.tokens
    assert by_string.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        reply.choices[0].logprobs.token_logprobs[1:], abs=1e-5
    )


def test_streamed_logprobs_equal_the_plain_ones(client):
    kwargs = dict(model="tiny", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    messages = [{"role": "user", "content": "Format the date"}]
    plain = (
        client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **kwargs)
        .choices[0]
        .logprobs.content
    )
    streamed = [
        e
        for chunk in client.chat.completions.create(
            messages=messages, logprobs=True, top_logprobs=2, stream=True, **kwargs
        )
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in plain]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in plain], abs=1e-5)
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [
        [t.token for t in e.top_logprobs] for e in plain
    ]

    plain = client.completions.create(prompt=PROMPT, logprobs=2, **kwargs).choices[0]
    tokens, offsets, values = [], [], []
    for chunk in client.completions.create(prompt=PROMPT, logprobs=2, stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == plain.logprobs.tokens and offsets == plain.logprobs.text_offset
    assert values == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_the_reported_tokens_too(client, stream):
    """Tokens that start after the cut are not part of the answer: neither is their logprob."""
    kwargs = dict(
        model="tiny",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kwargs).choices[0]
    cut = next(i for i in range(3, len(full.text) - 1) if full.text[i : i + 2].strip())
    stop = full.text[cut : cut + 2]
    cut = full.text.index(stop)
    expected = [
        t for t, start in zip(full.logprobs.tokens, full.logprobs.text_offset) if start < cut
    ]
    if stream:
        text, tokens = "", []
        for chunk in client.completions.create(stop=stop, stream=True, **kwargs):
            text += chunk.choices[0].text
            tokens += chunk.choices[0].logprobs.tokens if chunk.choices[0].logprobs else []
    else:
        stopped = client.completions.create(stop=stop, **kwargs).choices[0]
        text, tokens = stopped.text, stopped.logprobs.tokens
    assert text == full.text[:cut]
    assert tokens == expected


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/chat/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"echo": True, "stream": "yes"}, "stream"),
        ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"frequency_penalty": "1"}, "frequency_penalty"),
        ("/v1/chat/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": [5]}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),  # the engine's check
        ("/v1/completions", {"echo": "yes"}, "echo"),
        ("/v1/completions", {"prompt": [[1, 2], [-1]]}, "prompt"),
        ("/v1/completions", {"prompt": [[]]}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),  # the engine knows the vocabulary
    ],
)
def test_bad_logprob_fields_are_400_naming_them(server, path, body, param):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    response = requests.post(
        server.url + path, json={"model": "tiny", "max_tokens": 2, **base, **body}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, json.dumps(response.json())


def test_tokens_holding_part_of_a_character_are_spelled_as_bytes(client, direct):
    """The tiny BPE splits "😀" and "は" into byte tokens: each is reported as OpenAI spells such a
    token ("bytes:\\xf0\\x9f"), and the tokens' bytes put together are the prompt's UTF-8."""
    tokenizer, _, _ = direct
    prompt = "ok 😀 は done"
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) > len(prompt.split()) + 3  # some characters span several tokens
    tokens = (
        client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
        .choices[0]
        .logprobs.tokens
    )
    assert any(t.startswith("bytes:") for t in tokens)
    data = b"".join(
        bytes(int(h, 16) for h in t[len("bytes:") :].split("\\x")[1:])
        if t.startswith("bytes:")
        else t.encode()
        for t in tokens
    )
    assert data.decode("utf-8") == prompt
