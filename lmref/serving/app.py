"""The Flask app of the model server: OpenAI-compatible routes, validation, auth and metrics.

``create_app(config)``: a WSGI app over one ``lmref.serving.engine.Engine`` per model version (the
engine batches and generates; the app speaks HTTP), for the official ``openai`` client unchanged.
It is assembled from one blueprint per concern and one state object:

- ``lmref.serving.routes_completions``: ``POST /v1/completions``, ``POST /v1/chat/completions``
  (SSE streaming, ``logprobs``, completions' ``echo``) and a plain ``POST /predict``; request and
  response shapes are ``lmref.serving.shaping`` and ``lmref.serving.schema`` (plain functions).
- ``lmref.serving.routes_admin``: ``GET /health``, ``GET /ready`` (503 until the models are loaded
  or while draining), ``GET /metrics`` (Prometheus, vLLM-like names with an ``lmref:`` prefix),
  ``GET /v1/models`` and ``GET /v1/models/{id}``.
- ``lmref.serving.routes_live``: ``/v1/admin/models``, ``/v1/admin/aliases/{alias}`` and
  ``/v1/admin/config``: load and unload versions and set alias weights while serving
  (``lmref.serving.live``).
- ``lmref.serving.routes_tokenize``: ``POST /tokenize``, ``POST /detokenize`` and
  ``GET /tokenizer_info`` (vLLM's shapes).
- ``lmref.serving.routes_page``: ``GET /``, a chat page (``lmref/serving/static/chat.html``).
- ``lmref.serving.openapi``: ``GET /openapi.json``, an OpenAPI 3.1 document of every route served.
- ``lmref.serving.guards``: API keys (``Authorization: Bearer``), the body-size check, the drain
  flag and the request counter; errors in the OpenAI shape ``{"error": {...}}``.
- ``lmref.serving.state``: the engines, aliases (weighted A/B), keys, response cache and metrics,
  in ``app.extensions["lmref"]``.

Usage::

    from lmref.serving.app import ModelSpec, ServingConfig, create_app

    app = create_app(ServingConfig(models=[ModelSpec("base", "artifacts/base")],
                                   api_keys=["sk-local"]))      # a WSGI app for any WSGI server

Run it with ``lmref.serve``: ``start_server(config)`` (a thread) or ``python -m lmref.serve``.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from lmref.serving.config import ServingConfig
from lmref.serving.engine import ModelSpec
from lmref.serving.guards import install
from lmref.serving.live import LiveConfig
from lmref.serving.openapi import api_docs
from lmref.serving.routes_admin import admin
from lmref.serving.routes_completions import completions
from lmref.serving.routes_live import LIVE_EXTENSION, live_admin
from lmref.serving.routes_page import page
from lmref.serving.routes_tokenize import tokenizer_routes
from lmref.serving.schema import HTTP_ERRORS, APIError
from lmref.serving.state import EXTENSION, ServingState

__all__ = ["HTTP_ERRORS", "APIError", "ModelSpec", "ServingConfig", "ServingState", "create_app"]


def create_app(config: ServingConfig, start: bool = True, cache: Any = None) -> Flask:
    """The Flask app. ``start`` launches the model workers (they load in the background unless
    ``config.load_in_background`` is False). The state is in ``app.extensions["lmref"]``.
    ``cache``: another response cache (``lmref.production.shared_cache``); default an in-process
    LRU."""
    state = ServingState(config, cache)
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_content_length,
        DEBUG=False,
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
    )
    app.json.sort_keys = False
    app.extensions[EXTENSION] = state
    app.extensions[LIVE_EXTENSION] = LiveConfig(state)  # a shared store replaces its store
    install(app)
    for blueprint in (page, admin, completions, tokenizer_routes, live_admin, api_docs):
        app.register_blueprint(blueprint)
    if start:
        state.start(wait=not config.load_in_background)
    return app
