"""Request shaping, logprob shaping and SSE chunks called as plain functions (no HTTP), and the
Batch worker's path (``lmref.serving.service.answer``) answering exactly what the HTTP route does."""

from __future__ import annotations

import json

import pytest

from lmref.serving.app import ModelSpec, ServingConfig, create_app
from lmref.serving.engine import Delta, EngineError, Failed, Finished, Job, SamplingParams
from lmref.serving.sampler import TokenLogprob, TopLogprob
from lmref.serving.schema import APIError
from lmref.serving.service import answer
from lmref.serving.shaping import (
    LogprobShaper,
    ResponseShape,
    api_error_of,
    build_job,
    completion_body,
    shape_request,
    sse,
    sse_stream,
    usage_of,
)
from lmref.serving.state import ServingState

pytestmark = pytest.mark.unit
CONFIG = ServingConfig(models=[ModelSpec("m", "unused")], api_keys=[])


def entry(token: str, logprob: float | None, *top: tuple[str, float]) -> TokenLogprob:
    tops = tuple(TopLogprob(t, tuple(t.encode()), lp) for t, lp in top)
    return TokenLogprob(0, token, tuple(token.encode()), logprob, tops)


def test_completion_request_becomes_rows_with_their_own_seeds():
    body = {"prompt": ["a", "b"], "n": 2, "seed": 7, "max_tokens": 5, "stop": "x"}
    shaped = shape_request({**body, "logprobs": 2, "echo": True}, CONFIG, chat=False)
    assert shaped.prompts == ["a", "b"] and shaped.n == 2 and not shaped.stream
    p = shaped.params
    assert (p.max_tokens, p.seed, p.stop, p.logprobs, p.echo) == (5, 7, ("x",), 2, True)
    job = build_job(shaped, "m")
    assert job.model_name == "m" and job.rows_total == 4
    assert [r.prompt for r in job.rows] == ["a", "a", "b", "b"]
    assert [r.params.seed for r in job.rows] == [7, 8, 7, 8]  # choice k: seed + k
    unseeded = build_job(shape_request({"prompt": "a", "n": 3}, CONFIG, chat=False), "m")
    assert [r.params.seed for r in unseeded.rows] == [None, None, None]
    assert shape_request({"prompt": "a"}, CONFIG, chat=False).params.max_tokens == 16


def test_chat_request_shape_and_errors_name_the_field():
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "logprobs": True,
        "top_logprobs": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    shaped = shape_request(body, CONFIG, chat=True)
    assert shaped.prompts == [[{"role": "user", "content": "hi"}]]
    assert shaped.params.logprobs == 3 and shaped.params.max_tokens is None  # chat: to EOS
    assert shaped.stream and shaped.include_usage and shaped.chat
    assert build_job(shaped, "m").rows[0].is_chat
    for bad, param in (({"temperature": 3}, "temperature"), ({"tools": [{}]}, "tools")):
        with pytest.raises(APIError) as err:
            shape_request({**body, **bad}, CONFIG, chat=True)
        assert err.value.status == 400 and err.value.param == param
    assert api_error_of(EngineError("invalid", "too long", "messages")).status == 400
    assert api_error_of(EngineError("closed", "bye")).status == 503
    assert api_error_of(EngineError("internal", "oops")).status == 500


def test_legacy_logprobs_offsets_run_on_across_chunks():
    entries = [entry("ab", -0.5, ("ab", -0.5), ("x", -1.0)), entry("c", -0.25), entry("de", -2.0)]
    whole = LogprobShaper(chat=False, wanted=1)(0, entries)
    assert whole["text_offset"] == [0, 2, 3] and whole["tokens"] == ["ab", "c", "de"]
    assert whole["top_logprobs"][0] == {"ab": -0.5, "x": -1.0}
    streamed = LogprobShaper(chat=False, wanted=1)
    first, second = streamed(0, entries[:2]), streamed(0, entries[2:])
    assert first["text_offset"] + second["text_offset"] == whole["text_offset"]
    assert streamed(1, entries[:1])["text_offset"] == [0]  # each choice counts its own
    chat = LogprobShaper(chat=True, wanted=1)(0, entries[:1])
    assert chat == {
        "content": [
            {
                "token": "ab",
                "logprob": -0.5,
                "bytes": [97, 98],
                "top_logprobs": [
                    {"token": "ab", "logprob": -0.5, "bytes": [97, 98]},
                    {"token": "x", "logprob": -1.0, "bytes": [120]},
                ],
            }
        ],
        "refusal": None,
    }
    assert LogprobShaper(chat=True, wanted=None)(0, entries) is None


def test_completion_body_echo_and_usage():
    shape = ResponseShape("cmpl-1", 5, "m", chat=False, logprobs=LogprobShaper(False, None))
    done = [Finished(0, "lo", "length", 3, 2, prompt_text="hel"), Finished(1, "!", "stop", 3, 1)]
    body = completion_body(shape, done, usage_of(done))
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"},
            {"index": 1, "text": "!", "logprobs": None, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9},
    }
    assert ResponseShape.new(True, "m", None).rid.startswith("chatcmpl-")


def frames(text: str) -> list:
    assert text.endswith("\n\n") and all(f.startswith("data: ") for f in text.split("\n\n")[:-1])
    return [f[6:] if f[6:] == "[DONE]" else json.loads(f[6:]) for f in text.split("\n\n")[:-1]]


def test_sse_stream_of_a_chat_job():
    job = Job("m", stream=True)
    job.add_row([], SamplingParams(), True)
    job.add_row([], SamplingParams(), True)
    closed = []

    def source():
        try:
            yield Delta(1, "Yo")
            yield Finished(0, "He", "stop", 3, 1, cached=True)  # from the cache: no deltas
            yield Finished(1, "Yo", "length", 3, 1)
        finally:
            closed.append(True)

    shape = ResponseShape("c-1", 9, "m", True, LogprobShaper(True, None), include_usage=True)
    out = frames("".join(sse_stream(job, [Delta(0, "He")], source(), shape)))
    assert closed == [True]  # the engine's event stream is closed: a gone client cancels
    choices = [f["choices"][0] if f != "[DONE]" and f["choices"] else f for f in out]
    assert [c["delta"] for c in choices[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [(c["index"], c["delta"], c["finish_reason"]) for c in choices[2:7]] == [
        (0, {"content": "He"}, None),
        (1, {"content": "Yo"}, None),
        (0, {"content": "He"}, None),
        (0, {}, "stop"),
        (1, {}, "length"),
    ]
    assert out[2]["object"] == "chat.completion.chunk" and out[2]["usage"] is None
    assert out[7]["choices"] == [] and out[7]["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 2,
        "total_tokens": 8,
    }
    assert out[8] == "[DONE]" and len(out) == 9


def test_sse_stream_failure_is_an_error_event_then_done():
    job = Job("m", stream=True)
    job.add_row("p", SamplingParams())
    failed = Failed(EngineError("invalid", "prompt too long", "prompt", "context_length"))
    shape = ResponseShape("c-2", 9, "m", False, LogprobShaper(False, 1), include_usage=True)
    out = frames(
        "".join(sse_stream(job, [], iter([Delta(0, "a", (entry("a", -1.0),)), failed]), shape))
    )
    assert out[0]["choices"][0]["text"] == "a"
    assert out[0]["choices"][0]["logprobs"]["text_offset"] == [0]
    assert out[1] == {
        "error": {
            "message": "prompt too long",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": "context_length",
        }
    }
    assert out[2:] == ["[DONE]"]  # no usage after a failure
    assert sse("[DONE]") == "data: [DONE]\n\n"


def _without_ids(body):
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k not in ("id", "created")}
    return body


def test_batch_path_answers_what_the_http_route_answers(tiny_model_dir):
    """``answer`` (what a Batch worker runs) gives the route's status and body, field for field,
    for answers and for errors alike."""
    config = ServingConfig(
        models=[ModelSpec("tiny", str(tiny_model_dir))], api_keys=[], load_in_background=False
    )
    app = create_app(config, cache=None)
    state = ServingState(config)
    state.start(wait=True)
    try:
        web = app.test_client()
        chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 4}
        cases = [
            ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2, "n": 2}),
            ("/v1/completions", {"prompt": ["def f(", "x"], "max_tokens": 3, "temperature": 0}),
            ("/v1/completions", {"prompt": "ab", "max_tokens": 0, "echo": True, "logprobs": 1}),
            ("/v1/chat/completions", {**chat, "max_tokens": -3}),
            ("/v1/chat/completions", {**chat, "model": "nope"}),
        ]
        for path, body in cases:
            response = web.post(path, json=body)
            status, direct = answer(state, path, body)
            assert status == response.status_code, (path, body)
            assert json.loads(json.dumps(_without_ids(direct))) == _without_ids(response.json)
        assert [answer(state, p, b)[0] for p, b in cases] == [200, 200, 200, 400, 404]
    finally:
        state.close()
        app.extensions["lmref"].close()
