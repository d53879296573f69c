"""The model server's OpenAI routes: ``POST /v1/completions`` and ``POST /v1/chat/completions``
(SSE streaming, ``logprobs``, completions' ``echo``) and a plain ``POST /predict``.

The routes only speak HTTP: the JSON body is read here, the rest is ``lmref.serving.service``
(resolve, submit, collect) and ``lmref.serving.shaping`` (response bodies and SSE chunks).

Usage::

    from lmref.serving.routes_completions import completions

    app.register_blueprint(completions)     # create_app does this
"""

from __future__ import annotations

import json
from collections.abc import Callable

from flask import Blueprint, Response, request

from lmref.serving.audit import MODEL, PROMPT, USAGE, current_request_id
from lmref.serving.current import current_principal, serving_state
from lmref.serving.schema import APIError
from lmref.serving.service import collect, counted, first_admission, predict, submit
from lmref.serving.shaping import ResponseShape, completion_body, sse_stream

completions = Blueprint("completions", __name__)


def parse_json() -> dict:
    """The request's JSON object; 415 for another content type, 400 for anything not a JSON
    object (NaN and Infinity included), 413 above the size limit."""
    if request.mimetype != "application/json":
        raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
    raw = request.get_data(cache=False)  # raises 413 above MAX_CONTENT_LENGTH

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def disconnected() -> Callable[[], bool]:
    """waitress's check whether the client went away, taken while the request context is there."""
    return request.environ.get("waitress.client_disconnected", lambda: False)


def audited(body: dict, chat: bool) -> None:
    """What the access line may hold of the request itself: its prompt, only when
    ``ServingConfig.log_prompts`` says so (privacy by default)."""
    if serving_state().config.log_prompts:
        request.environ[PROMPT] = body.get("messages" if chat else "prompt")


def completion(chat: bool):
    body = parse_json()
    state = serving_state()
    audited(body, chat)
    engine, job, shaped = submit(state, body, chat, current_principal().owner, current_request_id())
    request.environ[MODEL] = engine.spec.name
    shape = ResponseShape.new(
        chat, engine.spec.name, shaped.params.logprobs, shaped.include_usage, shaped.params.tools
    )
    cost = request.environ.setdefault(USAGE, {"prompt_tokens": 0, "completion_tokens": 0})
    if not shaped.stream:
        choices, usage = collect(engine, job, disconnected())
        cost.update(
            prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"]
        )
        return completion_body(shape, choices, usage)
    source = counted(engine, engine.events(job, disconnected()))
    buffered = first_admission(source)  # a too-long prompt is a 400, not a stream
    return Response(
        sse_stream(job, buffered, source, shape, cost),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@completions.post("/v1/completions")
def text_completions():
    return completion(chat=False)


@completions.post("/v1/chat/completions")
def chat_completions():
    return completion(chat=True)


@completions.post("/predict")
def predict_route():
    """The simplest case: {"prompt": "..."} -> {"completion": "...", ...}; greedy by default."""
    body = parse_json()
    audited(body, chat=False)
    answer = predict(
        serving_state(), body, disconnected(), current_principal().owner, current_request_id()
    )
    request.environ[MODEL] = answer["model"]
    request.environ[USAGE] = {k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
    return answer
