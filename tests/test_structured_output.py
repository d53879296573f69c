"""Structured output (``response_format``) on a real server of SmolLM2-135M-Instruct.

One in-process server for the module: the openai client's ``parse`` and LangChain's
``with_structured_output`` get instances of their Pydantic model; json_object is valid JSON;
a constrained and an unconstrained row in one batch are both right; bad shapes and unsupported
schemas are 400s naming what is wrong; streaming sends the same JSON.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests
from pydantic import BaseModel, Field

from lmref.serving.constraints import JSON_OBJECT, Grammar
from lmref.serving.engine import Job, SamplingParams

pytestmark = pytest.mark.integration  # a real server in a thread


class Person(BaseModel):
    # Bounded fields: even a sampled answer ends within max_tokens.
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


def ask(who: str) -> list[dict]:
    return [{"role": "user", "content": f"Describe {who} as JSON with a name and an age."}]


@pytest.mark.parametrize(
    "who, temperature", [("Bob, aged 30", 0.0), ("a young girl", 0.7), ("an old king", 1.0)]
)
def test_openai_parse_returns_the_model(smol_client, who, temperature):
    reply = smol_client.chat.completions.parse(
        model="smol",
        messages=ask(who),
        response_format=Person,
        temperature=temperature,
        seed=3,
        max_tokens=60,
    )
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and reply.choices[0].finish_reason == "stop"


def test_json_object_is_valid_json_on_both_routes(smol_client):
    chat = smol_client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
    )
    assert chat.choices[0].finish_reason == "stop", chat.choices[0].message.content
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    plain = smol_client.completions.create(
        model="smol",
        prompt='The JSON object {"ok": true} is written as: ',
        temperature=0,
        max_tokens=80,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert plain.choices[0].finish_reason == "stop", plain.choices[0].text
    assert isinstance(json.loads(plain.choices[0].text), dict)


def test_langchain_with_structured_output(smol_server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=smol_server.url + "/v1", api_key="x", model="smol", temperature=0, max_retries=0
    )
    person = llm.with_structured_output(Person).invoke("Describe Carol, aged 41, as JSON.")
    assert isinstance(person, Person)


def test_streaming_sends_the_same_json(smol_client):
    kwargs = dict(
        model="smol",
        messages=ask("Dan"),
        temperature=0,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": Person.model_json_schema()},
        },
    )
    whole = smol_client.chat.completions.create(**kwargs).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in smol_client.chat.completions.create(**kwargs, stream=True)
        if c.choices
    ]
    assert "".join(parts) == whole and Person.model_validate_json(whole)


def test_constrained_and_free_rows_in_one_batch(smol_server):
    """One job, so both rows are in the same step: the free row's greedy text is the text it
    gets alone, and the constrained one is valid JSON; the mask's cost per token is reported."""
    engine = smol_server.state.engines["smol"]
    messages = ask("Eve")

    def run(*rows: SamplingParams) -> list[str]:
        job = Job("smol", stream=False)
        for params in rows:
            job.add_row(messages, params, is_chat=True)
        engine.submit(job)
        return [f.text for f in engine.results(job)]

    free = SamplingParams(max_tokens=24, temperature=0)
    schema = Grammar.json_schema(Person.model_json_schema())
    before = engine.grammars.masked_tokens, engine.grammars.mask_seconds
    together = run(SamplingParams(max_tokens=60, temperature=0, grammar=schema), free)
    alone = run(free)
    assert together[1] == alone[0] and together[1] != together[0]  # the mask did not leak
    assert Person.model_validate_json(together[0])
    tokens = engine.grammars.masked_tokens - before[0]
    per_token_us = (engine.grammars.mask_seconds - before[1]) / tokens * 1e6
    print(f"mask cost: {per_token_us:.0f} us per constrained token over {tokens} tokens")
    assert 0 < per_token_us < 50_000


@pytest.mark.parametrize(
    "response_format, says",
    [
        ("json", "must be an object"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "json_schema' must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": 3}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "p", "strict": "y"}}, "strict"),
    ],
)
def test_bad_response_format_shapes_are_400(smol_server, response_format, says):
    body = {"model": "smol", "messages": ask("x"), "response_format": response_format}
    r = requests.post(smol_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and says in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_unsupported_schema_is_400_naming_the_keyword(smol_client, stream):
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        smol_client.chat.completions.create(
            model="smol",
            messages=ask("x"),
            max_tokens=8,
            stream=stream,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        )
    assert caught.value.body["param"] == "response_format"
    assert "not" in caught.value.body["message"]


def test_ignore_eos_with_a_grammar_is_400(smol_server):
    body = {
        "model": "smol",
        "prompt": "x",
        "ignore_eos": True,
        "response_format": {"type": "json_object"},
    }
    r = requests.post(smol_server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"


def test_json_object_grammar_is_shared():
    assert Grammar.json_schema({"type": "object"}) == JSON_OBJECT
