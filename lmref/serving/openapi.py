"""``GET /openapi.json``: an OpenAPI 3.1 document of every route this app really serves.

The paths and methods come from the app's own ``url_map`` (a replica without the Batch API
documents no ``/v1/files``; a route added by a blueprint appears by itself); the chat and
completions request bodies from ``lmref.serving.openai_fields`` (the server's own request
checks, probed); the security of each route from ``lmref.serving.auth.scope_for`` and the
guard's public paths; summaries, other bodies and query parameters from ``ROUTES`` below, with
a route's docstring as the fallback. Errors are the OpenAI shape (``lmref.serving.schema``).

Public, like ``/health``: the document holds no secret and no model name, only what any client
of an OpenAI-compatible server may call, and tools (code generators, Swagger UI) read it before
they have a key.

Usage::

    from lmref.serving.openapi import openapi_document

    doc = openapi_document(app)          # a dict; create_app serves it at GET /openapi.json
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flask import Blueprint, Flask, current_app

from lmref.serving.auth import scope_for
from lmref.serving.guards import PUBLIC_PATHS
from lmref.serving.openai_fields import NUM, OBJ, STR, field_support

api_docs = Blueprint("api_docs", __name__)
DOC_EXTENSION = "lmref.openapi"  # app.extensions: the document, built once (routes are fixed)
SKIPPED_METHODS = {"HEAD", "OPTIONS"}


@dataclass(frozen=True)
class RouteDoc:
    """What ``url_map`` cannot say about one route: a summary, its JSON body's properties (or
    ``form`` for multipart), query parameters, the errors beside the common ones, and what a
    success returns (``media``)."""

    summary: str
    body: dict | None = None
    required: tuple[str, ...] = ()
    form: dict | None = None
    query: dict = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    media: str = "application/json"
    status: int = 200  # a success's status


PAGING = {"limit": {"type": "integer", "minimum": 1}, "after": STR}
# Keyed by "METHOD rule" as Flask writes the rule; chat and completions bodies are probed.
ROUTES = {
    "GET /": RouteDoc("The chat page", media="text/html"),
    "GET /health": RouteDoc("Liveness: the process answers"),
    "GET /ready": RouteDoc("Readiness: 503 until every model is loaded, or while draining"),
    "GET /metrics": RouteDoc("Prometheus metrics (lmref: prefix)", media="text/plain"),
    "GET /openapi.json": RouteDoc("This document"),
    "GET /v1/models": RouteDoc("The served versions and aliases"),
    "GET /v1/models/<path:name>": RouteDoc("One version or alias", errors=(404,)),
    "POST /v1/chat/completions": RouteDoc(
        "A chat completion (stream: text/event-stream)", errors=(400, 404, 415, 429)
    ),
    "POST /v1/completions": RouteDoc(
        "A text completion (stream: text/event-stream)", errors=(400, 404, 415, 429)
    ),
    "POST /predict": RouteDoc(
        "The simplest case: {prompt} -> {completion}, greedy by default",
        body={"prompt": STR, "max_tokens": {"type": "integer"}, "temperature": NUM},
        required=("prompt",),
        errors=(400, 415, 429),
    ),
    "GET /v1/admin/config": RouteDoc("The wanted live configuration and what this server runs"),
    "POST /v1/admin/models": RouteDoc(
        "Load a version (202: it joins routing once loaded); other keys: ModelSpec settings",
        body={"name": STR, "model": STR},
        required=("name", "model"),
        errors=(400, 409, 415),
        status=202,
    ),
    "DELETE /v1/admin/models/<path:name>": RouteDoc(
        "Unload a version (409 while an alias routes to it)", errors=(404, 409), status=202
    ),
    "PUT /v1/admin/aliases/<path:alias>": RouteDoc(
        "Set an alias's split",
        body={"weights": {"type": "object", "additionalProperties": NUM}},
        required=("weights",),
        errors=(400, 415),
    ),
    "GET /v1/admin/keys": RouteDoc("The key store's records (never a secret)"),
    "GET /v1/admin/usage": RouteDoc("Each key's requests and tokens"),
    "POST /v1/files": RouteDoc(
        "Upload a JSONL of batch requests",
        form={
            "file": {"type": "string", "contentMediaType": "application/jsonl"},
            "purpose": {"const": "batch"},
        },
        required=("file", "purpose"),
        errors=(400,),
    ),
    "GET /v1/files": RouteDoc(
        "The caller's files, newest first", query={**PAGING, "purpose": STR}, errors=(400,)
    ),
    "GET /v1/files/<file_id>": RouteDoc("A file's metadata", errors=(404,)),
    "DELETE /v1/files/<file_id>": RouteDoc("Delete a file", errors=(404,)),
    "GET /v1/files/<file_id>/content": RouteDoc(
        "A file's content", errors=(404,), media="application/jsonl"
    ),
    "POST /v1/batches": RouteDoc(
        "Create a batch from an uploaded file",
        body={
            "input_file_id": STR,
            "endpoint": {"enum": ["/v1/chat/completions", "/v1/completions"]},
            "completion_window": {"const": "24h"},
            "metadata": {"type": ["object", "null"], "additionalProperties": STR},
        },
        required=("input_file_id", "endpoint", "completion_window"),
        errors=(400, 404),
    ),
    "GET /v1/batches": RouteDoc("The caller's batches, newest first", query=PAGING, errors=(400,)),
    "GET /v1/batches/<batch_id>": RouteDoc("A batch, its counts as they are now", errors=(404,)),
    "POST /v1/batches/<batch_id>/cancel": RouteDoc(
        "Cancel a batch (409 once it ended)", errors=(404, 409)
    ),
}
ERROR_WORDS = {
    400: "A field is wrong: error.param names it",
    401: "No valid API key",
    403: "The key lacks the scope this route needs",
    404: "Not found",
    409: "Conflicts with the current state",
    413: "Request body too large",
    415: "Content-Type must be application/json",
    429: "Rate limit, token quota or a full queue (Retry-After)",
    503: "Loading, draining or a backing service down (Retry-After)",
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": STR,
                "type": STR,
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def openapi_path(rule: str) -> tuple[str, list[str]]:
    """Flask's ``/v1/models/<path:name>`` as OpenAPI's ``/v1/models/{name}``, and the names."""
    names = re.findall(r"<(?:[^:<>]+:)?([^<>]+)>", rule)
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule), names


def completion_body(chat: bool, config) -> dict:
    """The chat or completions body: every OpenAI field with its probed support in
    ``x-lmref-support`` (a refused field's schema says which values are taken as unset)."""
    props, required = {}, ["messages" if chat else "prompt"]
    for name, s in field_support(chat, config).items():
        schema = {**s.field.schema, "description": f"{s.status}: {s.how}".rstrip(": ")}
        props[name] = {**schema, "x-lmref-support": s.status}
    return {"type": "object", "required": required, "properties": props}


def _body(doc: RouteDoc, rule: str, config) -> dict | None:
    if rule in ("/v1/chat/completions", "/v1/completions"):
        schema = completion_body(rule == "/v1/chat/completions", config)
        return {"required": True, "content": {"application/json": {"schema": schema}}}
    if doc.body is None and doc.form is None:
        return None
    media = "application/json" if doc.form is None else "multipart/form-data"
    schema = {"type": "object", "properties": doc.body or doc.form, "required": list(doc.required)}
    return {"required": True, "content": {media: {"schema": schema}}}


def _operation(app: Flask, method: str, rule, config) -> dict:
    names = openapi_path(rule.rule)[1]
    # A route nobody described yet (a blueprint added later): its docstring's first line.
    view_doc = (app.view_functions[rule.endpoint].__doc__ or "").strip()
    doc = ROUTES.get(f"{method} {rule.rule}") or RouteDoc(view_doc.split("\n")[0] or rule.endpoint)
    public = rule.rule in PUBLIC_PATHS
    errors = sorted({*doc.errors, 413, *(() if public else (401, 403, 503))})
    content = {doc.media: {"schema": OBJ if doc.media == "application/json" else STR}}
    op = {
        "operationId": f"{method.lower()}_{rule.endpoint.replace('.', '_')}",
        "summary": doc.summary,
        "tags": [rule.endpoint.split(".")[0]],
        "responses": {
            str(doc.status): {
                "description": "OK",
                "content": content,
            },
            **{str(s): {"$ref": f"#/components/responses/E{s}"} for s in errors},
        },
        # OpenAPI 3.1: a non-OAuth scheme's requirement may list roles: the key's scope.
        "security": [] if public else [{"bearerAuth": [scope_for(rule.rule.split("<")[0])]}],
    }
    params = [{"name": n, "in": "path", "required": True, "schema": STR} for n in names] + [
        {"name": n, "in": "query", "schema": s} for n, s in doc.query.items()
    ]
    if params:
        op["parameters"] = params
    body = _body(doc, rule.rule, config)
    if body:
        op["requestBody"] = body
    return op


def openapi_document(app: Flask) -> dict:
    """The app's OpenAPI 3.1 document (see the module's docstring)."""
    config = app.extensions["lmref"].config
    paths: dict[str, dict] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - SKIPPED_METHODS):
            path = openapi_path(rule.rule)[0]
            paths.setdefault(path, {})[method.lower()] = _operation(app, method, rule, config)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lmref model server",
            "version": "1",
            "description": "An OpenAI-compatible server (lmref.serving). Errors are OpenAI's "
            "{error: {message, type, param, code}}. Keys: Authorization: Bearer KEY; each "
            "route needs one scope (inference, batch, admin); a server run without keys lets "
            "anyone in.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "responses": {
                f"E{s}": {
                    "description": words,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for s, words in ERROR_WORDS.items()
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key; its scopes (lmref.serving.auth.SCOPES) say "
                    "which routes it may call",
                }
            },
        },
    }


@api_docs.get("/openapi.json")
def openapi_json():
    """This server's OpenAPI 3.1 document."""
    app = current_app._get_current_object()
    if DOC_EXTENSION not in app.extensions:  # routes are fixed once serving: build once
        app.extensions[DOC_EXTENSION] = openapi_document(app)
    return app.extensions[DOC_EXTENSION]
