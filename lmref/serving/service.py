"""One OpenAI request served over a ``ServingState``, without HTTP: resolve the model, shape the
request, queue it on the engine, collect the choices, shape the answer.

The Flask routes call these inside a request (passing waitress's disconnect check); the Batch
worker (``lmref.production.worker``) calls ``answer`` directly, so a batch line holds exactly the
body the HTTP server would have sent.

Usage::

    from lmref.serving.service import answer, complete

    state = ServingState(config); state.start(wait=True)     # lmref.serving.state
    body = complete(state, {"model": "base", "prompt": "def f(", "max_tokens": 8}, chat=False)
    status, body = answer(state, "/v1/chat/completions", {"messages": [...]})  # errors too
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lmref.serving.engine import Admitted, Engine, EngineError, Failed, Finished, Job, QueueFull
from lmref.serving.schema import APIError, bad
from lmref.serving.shaping import (
    ResponseShape,
    ShapedRequest,
    api_error_of,
    build_job,
    completion_body,
    predict_body,
    shape_request,
    usage_of,
)
from lmref.serving.state import ServingState

ENDPOINTS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat


def _never() -> bool:
    return False


def failed(engine: Engine, err: APIError) -> APIError:
    """Count a server-side failure (a 5xx, a full queue) of a request routed to ``engine``'s
    version in ``lmref:request_errors`` (a client's mistake is not the version's); returns
    ``err`` to raise."""
    if err.status >= 500 or err.status == 429:
        reason = err.code or str(err.status)
        engine.metrics.request_errors.labels(model_name=engine.spec.name, reason=reason).inc()
    return err


def counted(engine: Engine, events: Iterable) -> Iterator:
    """A stream's events, its ``Failed`` ones counted as ``failed`` counts them; closing it
    closes ``events`` (the engine cancels the job of a reader that went away)."""
    try:
        for event in events:
            if isinstance(event, Failed):
                failed(engine, api_error_of(event.error))
            yield event
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def submit(
    state: ServingState,
    body: dict,
    chat: bool,
    tenant: str | None = None,
    request_id: str = "",
) -> tuple[Engine, Job, ShapedRequest]:
    """Resolve the model (a 404 or 503 comes before any field check), shape the request and
    queue its job; a full queue is a 429. ``tenant``: the caller's owner, whose cached answers
    alone it may reuse (unless the deployment shares the cache: ``shared_response_cache``);
    ``request_id``: the caller's, for the engine's log lines."""
    engine = state.resolve(body.get("model"), body.get("user"))
    shaped = shape_request(body, state.config, chat)
    rows = len(shaped.prompts) * shaped.n
    if rows > engine.spec.max_queue_size:  # could never be queued: not a 429
        raise bad(f"{len(shaped.prompts)} prompts x n={shaped.n} exceed the queue size", "n")
    tenant = None if state.config.shared_response_cache else tenant
    job = build_job(shaped, engine.spec.name, tenant, request_id)
    try:
        engine.submit(job)
    except QueueFull:
        raise failed(
            engine,
            APIError(
                429,
                "The server is busy: the request queue is full",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ),
        ) from None
    except EngineError as err:
        raise failed(engine, api_error_of(err)) from None
    return engine, job, shaped


def first_admission(events: Iterable) -> list:
    """Read a stream's events up to ``Admitted``, so a too-long prompt is a 400 and not a
    stream; the events read before it, to send first."""
    buffered = []
    for event in events:
        if isinstance(event, Failed):
            raise api_error_of(event.error)
        if isinstance(event, Admitted):
            return buffered
        buffered.append(event)
    return buffered


def collect(
    engine: Engine, job: Job, disconnected: Callable[[], bool] = _never
) -> tuple[list[Finished], dict]:
    """Every choice, in order, and the usage; a 499 when the client went away meanwhile."""
    try:
        ordered = engine.results(job, disconnected)
    except EngineError as err:
        raise failed(engine, api_error_of(err)) from None
    if ordered is None:  # the client went away; nobody reads this
        raise APIError(499, "client closed request", code="client_closed")
    return ordered, usage_of(ordered)


def complete(
    state: ServingState,
    body: dict,
    chat: bool,
    disconnected: Callable[[], bool] = _never,
    tenant: str | None = None,
    request_id: str = "",
) -> dict:
    """A whole chat or completions response (``stream`` is not honoured here: see the route)."""
    engine, job, shaped = submit(state, body, chat, tenant, request_id)
    shape = ResponseShape.new(
        chat, engine.spec.name, shaped.params.logprobs, tools=shaped.params.tools
    )
    choices, usage = collect(engine, job, disconnected)
    return completion_body(shape, choices, usage)


def predict(
    state: ServingState,
    body: dict,
    disconnected: Callable[[], bool] = _never,
    tenant: str | None = None,
    request_id: str = "",
) -> dict:
    """The simplest case: {"prompt": "..."} -> {"completion": "...", ...}; greedy by default."""
    body = {"temperature": 0.0, **body, "stream": False}
    if not isinstance(body.get("prompt"), str):
        raise bad("'prompt' must be a string", "prompt")
    engine, job, _ = submit(state, body, False, tenant, request_id)
    choices, usage = collect(engine, job, disconnected)
    return predict_body(engine.spec.name, choices, usage)


def answer(
    state: ServingState, path: str, body: dict, tenant: str | None = None, request_id: str = ""
) -> tuple[int, Any]:
    """The status and JSON body the server would answer ``POST path`` with (an ``APIError`` is
    an answer too), for ``tenant`` (the Batch worker: the batch's owner). Other exceptions
    propagate: the caller decides what they mean. ``request_id``: the caller's (a Batch
    line's), named by the engine's log lines."""
    if path not in ENDPOINTS:
        return 404, APIError(404, "not found: " + path, "not_found_error", code="not_found").body()
    try:
        return 200, complete(state, body, ENDPOINTS[path], tenant=tenant, request_id=request_id)
    except APIError as err:
        return err.status, err.body()
