"""The model server's tokenizer routes, as vLLM serves them: ``POST /tokenize``,
``POST /detokenize`` and ``GET /tokenizer_info``; inference routes (an API key with the
``inference`` scope). The work is ``lmref.serving.tokenizing``; ``model`` may be left out (the
default model, as lm-evaluation-harness's remote tokenizer sends no model).

Usage::

    from lmref.serving.routes_tokenize import tokenizer_routes

    app.register_blueprint(tokenizer_routes)     # create_app does this
"""

from __future__ import annotations

from flask import Blueprint, request

from lmref.serving.audit import MODEL
from lmref.serving.current import serving_state
from lmref.serving.routes_completions import parse_json
from lmref.serving.tokenizing import detokenize, tokenize, tokenizer_info

tokenizer_routes = Blueprint("tokenizer", __name__)


def _engine(body: dict):
    engine = serving_state().resolve(body.get("model"), body.get("user"))
    request.environ[MODEL] = engine.spec.name
    return engine


@tokenizer_routes.post("/tokenize")
def tokenize_route():
    """Token ids of a prompt or of chat messages (vLLM's shape: count, max_model_len, tokens)"""
    body = parse_json()
    return tokenize(_engine(body), body)


@tokenizer_routes.post("/detokenize")
def detokenize_route():
    """The text of token ids (vLLM's shape: prompt)"""
    body = parse_json()
    return detokenize(_engine(body), body)


@tokenizer_routes.get("/tokenizer_info")
def tokenizer_info_route():
    """The tokenizer's settings, for lm-eval's tokenizer_backend=remote"""
    return tokenizer_info(_engine({"model": request.args.get("model")}))
