"""The Flask app of the model server: OpenAI-compatible routes, validation, auth and metrics.

``create_app(config)``: a WSGI app over one ``lmref.serving.engine.Engine`` per model version (the engine
batches and generates; this module speaks HTTP), for the official ``openai`` client unchanged:

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming, ``logprobs``,
  completions' ``echo``), ``GET /v1/models``, ``GET /v1/models/{id}`` and a plain
  ``POST /predict``; errors in the OpenAI shape ``{"error": {...}}``; fields the server does not
  implement are a 400 that names them. Request checks and response shapes: ``lmref.serving.schema``.
- ``GET /health`` (liveness), ``GET /ready`` (503 until the models are loaded or while draining),
  ``GET /metrics`` (Prometheus, vLLM-like names with an ``lmref:`` prefix).
- ``GET /``: a chat page (``lmref/serving/static/chat.html``: streams from the chat route, picks a model
  version, shows TTFT and tokens/s; asks for an API key when auth is on).
- 429 when a model's queue is full; API keys (``Authorization: Bearer``), model versions,
  weighted A/B aliases, a response cache for greedy requests.

Usage::

    from lmref.serving.app import ModelSpec, ServingConfig, create_app

    app = create_app(ServingConfig(models=[ModelSpec("base", "artifacts/base")],
                                   api_keys=["sk-local"]))      # a WSGI app for any WSGI server

Run it with ``lmref.serve``: ``start_server(config)`` (a thread) or ``python -m lmref.serve``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.resources
import itertools
import json
import logging
import os
import random
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from werkzeug.exceptions import HTTPException

from lmref.serving.engine import (
    Admitted,
    Delta,
    Engine,
    EngineError,
    EngineMetrics,
    Failed,
    Finished,
    Job,
    ModelSpec,
    QueueFull,
    ResponseCache,
    SamplingParams,
)
from lmref.serving.schema import (
    HTTP_ERRORS,
    APIError,
    bad,
    chat_logprobs,
    chat_messages,
    completion_logprobs,
    completion_prompts,
    sampling_fields,
    stream_flags,
)

log = logging.getLogger("lmref.serving.app")
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/metrics"})  # "/": the page asks for a key


@dataclass
class ServingConfig:
    """Everything ``create_app`` needs. ``api_keys=None`` reads env ``LMREF_API_KEYS`` (comma list);
    an empty list means no auth (loopback demos only)."""

    models: list[ModelSpec]
    aliases: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # {"prod": {"v1": .9, "v2": .1}}
    default_model: str | None = None  # used when a request names no model; first by default
    api_keys: list[str] | None = None
    max_content_length: int = 1 << 20  # bytes of request body (413 above)
    max_stop_strings: int = 4
    default_max_tokens: int = 16
    max_tokens_limit: int | None = None  # an operator cap below the context length
    cache_size: int = 1024  # greedy responses kept (LRU); 0 turns the cache off
    load_in_background: bool = True  # /ready says 503 until loaded
    torch_threads: int | None = None  # torch.set_num_threads; small models: 1 is fastest
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    server_threads: int = 64  # waitress threads: one per concurrent request

    def validate(self) -> None:
        """ValueError naming what is wrong: no models, a name used twice, a bad alias."""
        if not self.models:
            raise ValueError("no models to serve: give at least one")
        names = [m.name for m in self.models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"model name {', '.join(twice)} is given more than once")
        for alias, split in self.aliases.items():
            if alias in names:
                raise ValueError(f"alias {alias!r} has the name of a served model")
            unknown = [v for v in split if v not in names]
            if not split or unknown:
                raise ValueError(
                    f"alias {alias!r} routes to {', '.join(unknown) or 'nothing'}, "
                    f"not a served model (served: {', '.join(names)})"
                )
            if any(w <= 0 for w in split.values()):
                raise ValueError(f"alias {alias!r}: every weight must be > 0")

    def resolved_api_keys(self) -> list[str]:
        """``api_keys``, or env ``LMREF_API_KEYS`` (comma list) when ``api_keys`` is None."""
        if self.api_keys is not None:
            return list(self.api_keys)
        return [k.strip() for k in os.environ.get("LMREF_API_KEYS", "").split(",") if k.strip()]


class ServingState:  # what one app holds: engines, aliases, keys, cache, metrics, drain flag
    def __init__(self, config: ServingConfig, cache: Any = None):  # cache: ResponseCache's API
        config.validate()
        self.config = config
        self.metrics = EngineMetrics()
        self.http_requests = Counter(
            "lmref:http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.metrics.registry,
        )
        self.cache = ResponseCache(config.cache_size) if cache is None else cache
        self.engines = {m.name: Engine(m, self.metrics, self.cache) for m in config.models}
        self.default_model = config.default_model or config.models[0].name
        # Digests, so compare_digest compares equal-length values and no key sits in memory twice.
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in config.resolved_api_keys()]
        self.draining = threading.Event()
        self._inflight = 0
        self._inflight_lock = threading.Condition()
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines.values()) and not self.draining.is_set()

    def resolve(self, name: Any, user: Any) -> Engine:
        name = self.default_model if name is None else name
        if not isinstance(name, str):
            raise bad("'model' must be a string", "model")
        split = self.config.aliases.get(name)
        if split:
            versions, weights = list(split), list(split.values())
            if isinstance(user, str) and user:  # sticky: one user always sees one version
                point = (
                    int.from_bytes(
                        hashlib.sha256(user.encode("utf-8", "replace")).digest()[:8], "big"
                    )
                    / 2**64
                    * sum(weights)
                )
                for name, w in zip(versions, weights):  # noqa: B007
                    if point < w:
                        break
                    point -= w
            else:
                name = random.choices(versions, weights)[0]
        engine = self.engines.get(name)
        if engine is None:
            raise APIError(
                404,
                f"The model '{name}' does not exist",
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        if engine.load_error:
            raise APIError(
                503,
                f"model '{name}' failed to load",
                "service_unavailable_error",
                code="model_load_failed",
            )
        if not engine.loaded.is_set():
            raise APIError(
                503,
                f"model '{name}' is loading",
                "service_unavailable_error",
                code="model_loading",
                headers={"Retry-After": "2"},
            )
        return engine

    def authorized(self, header: str | None) -> bool:
        if not self.key_digests:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        presented = hashlib.sha256(header[7:].strip().encode("utf-8", "replace")).digest()
        ok = False
        for digest in self.key_digests:  # no early exit: time does not depend on which key matched
            ok |= secrets.compare_digest(digest, presented)
        return ok

    def enter(self) -> None:
        with self._inflight_lock:
            self._inflight += 1

    def leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1
            self._inflight_lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until in-flight HTTP requests are done; False when the timeout ran out first."""
        with self._inflight_lock:
            return self._inflight_lock.wait_for(lambda: self._inflight <= 0, timeout)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def api_error_of(err: EngineError) -> APIError:
    status, type_ = {
        "invalid": (400, "invalid_request_error"),
        "closed": (503, "service_unavailable_error"),
    }.get(err.kind, (500, "server_error"))
    return APIError(status, err.message, type_, param=err.param, code=err.code)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


def _parse_json() -> dict:
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


def create_app(config: ServingConfig, start: bool = True, cache: Any = None) -> Flask:
    """The Flask app. ``start`` launches the model workers (they load in the background unless
    ``config.load_in_background`` is False). The state is in ``app.extensions["lmref"]``.
    ``cache``: another response cache (``lmref.production.shared_cache``); default an in-process LRU."""
    state = ServingState(config, cache)
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_content_length,
        DEBUG=False,
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
    )
    app.json.sort_keys = False
    app.extensions["lmref"] = state
    metrics = state.metrics

    def error_response(err: APIError) -> Response:
        return Response(
            json.dumps(err.body()), err.status, err.headers, mimetype="application/json"
        )

    app.register_error_handler(APIError, error_response)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        type_, code = HTTP_ERRORS.get(err.code or 500, ("invalid_request_error", None))
        message = {404: "not found: " + request.path, 413: "request body too large"}.get(
            err.code, err.description or err.name
        )
        return error_response(APIError(err.code or 500, message, type_, code=code))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):  # logged here; the client never sees a traceback
        log.exception("unhandled error on %s", request.path)
        return error_response(
            APIError(500, "internal server error", "server_error", code="internal_error")
        )

    @app.before_request
    def _guard():
        # The declared size before auth or reading (waitress caps what it reads: lmref.serve).
        if (request.content_length or 0) > config.max_content_length:
            raise APIError(413, "request body too large", code="request_too_large")
        if request.path in PUBLIC_PATHS:
            return None
        if not state.authorized(request.headers.get("Authorization")):
            raise APIError(
                401,
                "Incorrect or missing API key (Authorization: Bearer <key>)",
                "authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if state.draining.is_set():
            raise APIError(
                503,
                "server is shutting down",
                "service_unavailable_error",
                code="shutting_down",
                headers={"Retry-After": "5"},
            )
        state.enter()
        request.environ["lmref.counted"] = True
        return None

    @app.after_request
    def _count(response: Response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        state.http_requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        if request.environ.pop("lmref.counted", False):
            response.call_on_close(state.leave)
        return response

    chat_page = importlib.resources.files("lmref.serving").joinpath("static/chat.html").read_text()

    @app.get("/")
    def index():
        return Response(chat_page, mimetype="text/html")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        models = {
            n: ("ready" if e.ready else e.load_error or "loading") for n, e in state.engines.items()
        }
        status = 200 if state.ready else 503
        return {
            "status": "ready"
            if status == 200
            else ("draining" if state.draining.is_set() else "loading"),
            "models": models,
        }, status

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": state.created, "owned_by": "lmref"}
        if name in state.engines:
            engine = state.engines[name]
            return {**card, "max_model_len": engine.context_length or None, "ready": engine.ready}
        return {**card, "routes": config.aliases[name]}

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [model_card(n) for n in [*state.engines, *config.aliases]],
        }

    @app.get("/v1/models/<path:name>")
    def model(name: str):
        if name not in state.engines and name not in config.aliases:
            raise APIError(
                404,
                f"The model '{name}' does not exist",
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        return model_card(name)

    def submit(body: dict, chat: bool) -> tuple[Engine, Job, bool, SamplingParams]:
        engine = state.resolve(body.get("model"), body.get("user"))
        fields, n = sampling_fields(body, config, chat)
        params = SamplingParams(**fields)
        stream, _ = stream_flags(body)
        if chat:
            prompts: list = [chat_messages(body)]
        else:
            prompts = completion_prompts(body)
        if len(prompts) * n > engine.spec.max_queue_size:  # could never be queued: not a 429
            raise bad(f"{len(prompts)} prompts x n={n} exceed the queue size", "n")
        job = Job(engine.spec.name, stream)
        for prompt in prompts:
            for k in range(n):  # n choices per prompt: seeded ones each get their own seed
                job.add_row(
                    prompt,
                    params
                    if params.seed is None or k == 0
                    else dataclasses.replace(params, seed=params.seed + k),
                    chat,
                )
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(
                429,
                "The server is busy: the request queue is full",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except EngineError as err:
            raise api_error_of(err) from None
        return engine, job, stream, params

    def first_admission(stream_events) -> list:  # a too-long prompt is a 400, not a stream
        buffered = []
        for event in stream_events:
            if isinstance(event, Failed):
                raise api_error_of(event.error)
            if isinstance(event, Admitted):
                return buffered
            buffered.append(event)
        return buffered

    def disconnected():  # waitress's check, taken while the request context is there
        return request.environ.get("waitress.client_disconnected", lambda: False)

    def collect(engine: Engine, job: Job) -> tuple[list[Finished], dict]:
        try:
            ordered = engine.results(job, disconnected())
        except EngineError as err:
            raise api_error_of(err) from None
        if ordered is None:  # the client went away; nobody reads this
            raise APIError(499, "client closed request", code="client_closed")
        usage = {
            "prompt_tokens": sum(c.prompt_tokens for c in ordered),
            "completion_tokens": sum(c.completion_tokens for c in ordered),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return ordered, usage

    def completion(chat: bool):
        body = _parse_json()
        engine, job, stream, params = submit(body, chat)
        _, include_usage = stream_flags(body)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        model = engine.spec.name
        offsets: dict[int, int] = collections.defaultdict(int)  # next token's text_offset

        def shaped(index: int, entries) -> dict | None:  # logprobs in chat's or legacy shape
            if params.logprobs is None:
                return None
            if chat:
                return chat_logprobs(entries)
            out = completion_logprobs(entries, offsets[index])
            offsets[index] += sum(len(e.token) for e in entries)
            return out

        if not stream:
            choices, usage = collect(engine, job)
            out = [
                {
                    "index": c.index,
                    **(
                        {"message": {"role": "assistant", "content": c.text}}
                        if chat
                        else {"text": c.prompt_text + c.text}
                    ),
                    "logprobs": shaped(c.index, (c.prompt_logprobs or ()) + (c.logprobs or ())),
                    "finish_reason": c.reason,
                }
                for c in choices
            ]
            return {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": out,
                "usage": usage,
            }
        source = engine.events(job, disconnected())
        buffered = first_admission(source)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(
            index: int,
            text: str | None,
            finish: str | None,
            role: bool = False,
            logprobs: tuple = (),
        ) -> dict:
            content = (
                {
                    "delta": {"role": "assistant", "content": ""}
                    if role
                    else {"content": text}
                    if text is not None
                    else {}
                }
                if chat
                else {"text": text or ""}
            )
            payload = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": index,
                        **content,
                        "logprobs": shaped(index, logprobs) if text is not None else None,
                        "finish_reason": finish,
                    }
                ],
            }
            return {**payload, "usage": None} if include_usage else payload

        def generate():
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            failed = False
            try:
                if chat:
                    for i in range(job.rows_total):
                        yield _sse(chunk(i, None, None, role=True))
                pending: list[str] = []
                for event in itertools.chain(buffered, source):
                    if isinstance(event, Delta):
                        pending.append(
                            _sse(chunk(event.index, event.text, None, logprobs=event.logprobs))
                        )
                    elif isinstance(event, Finished):
                        usage["prompt_tokens"] += event.prompt_tokens
                        usage["completion_tokens"] += event.completion_tokens
                        if event.cached and event.text:  # no deltas came: the text at once
                            pending.append(
                                _sse(
                                    chunk(
                                        event.index, event.text, None, logprobs=event.logprobs or ()
                                    )
                                )
                            )
                        pending.append(_sse(chunk(event.index, None, event.reason)))
                    elif isinstance(event, Failed):
                        pending.append(_sse(api_error_of(event.error).body()))
                        failed = True
                        break
                    # One write for all the events already waiting: under load a thread that
                    # fell behind catches up with one socket write instead of one per token.
                    if pending and job.events.empty():
                        yield "".join(pending)
                        pending = []
                if pending:
                    yield "".join(pending)
                if not failed and include_usage:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield _sse(
                        {
                            "id": rid,
                            "object": kind,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage,
                        }
                    )
            except Exception:  # after the headers went out an error can only be an event
                log.exception("stream failed")
                yield _sse(
                    APIError(
                        500, "internal server error", "server_error", code="internal_error"
                    ).body()
                )
            finally:
                source.close()  # a client that went away cancels its rows (see events())
            yield _sse("[DONE]")

        return Response(
            generate(),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/completions")
    def completions():
        return completion(chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return completion(chat=True)

    @app.post("/predict")
    def predict():
        """The simplest case: {"prompt": "..."} -> {"completion": "...", ...}; greedy by default."""
        body = _parse_json()
        body = {"temperature": 0.0, **body, "stream": False}
        if not isinstance(body.get("prompt"), str):
            raise bad("'prompt' must be a string", "prompt")
        engine, job, _, _ = submit(body, chat=False)
        choices, usage = collect(engine, job)
        return {
            "model": engine.spec.name,
            "completion": choices[0].text,
            "finish_reason": choices[0].reason,
            "usage": usage,
        }

    if start:
        for engine in state.engines.values():
            engine.start()
        if not config.load_in_background:
            for engine in state.engines.values():
                engine.loaded.wait()
    return app
