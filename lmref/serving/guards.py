"""What every request of the model server passes: its request id, the body-size check, API
keys, the drain flag and the in-flight count (before the route), the request counter, the
``X-Request-ID`` header and the access line (after it: ``lmref.serving.audit``), and errors in
the OpenAI shape ``{"error": {...}}`` whatever raised them (no traceback reaches a client).

Usage::

    from lmref.serving.guards import install

    install(app)      # create_app does this; the state is lmref.serving.state.serving_state()
"""

from __future__ import annotations

import json
import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from lmref.serving.audit import begin, current_request_id, finish
from lmref.serving.auth import scope_for
from lmref.serving.current import PRINCIPAL, serving_state
from lmref.serving.schema import HTTP_ERRORS, APIError

log = logging.getLogger("lmref.serving.app")
# "/": the page asks for a key; /openapi.json: describes routes, no secret (lmref.serving.openapi)
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/metrics", "/openapi.json"})


def error_response(err: APIError) -> Response:
    return Response(json.dumps(err.body()), err.status, err.headers, mimetype="application/json")


def http_error(err: HTTPException) -> Response:
    """werkzeug's errors (404, 405, 413 ...) in the OpenAI shape."""
    type_, code = HTTP_ERRORS.get(err.code or 500, ("invalid_request_error", None))
    message = {404: "not found: " + request.path, 413: "request body too large"}.get(
        err.code, err.description or err.name
    )
    return error_response(APIError(err.code or 500, message, type_, code=code))


def unexpected_error(err: Exception) -> Response:  # logged here; the client never sees a traceback
    log.exception("unhandled error on %s (request %s)", request.path, current_request_id())
    return error_response(
        APIError(500, "internal server error", "server_error", code="internal_error")
    )


def guard() -> None:
    """Before every route: the declared body size, then the API key and its scope for the path
    (not for public paths; the caller goes to ``current_principal()``), then the drain flag; a
    request let through is counted in flight until its response closes. Its id comes first, so
    that every answer, a 413 or a 401 too, carries one."""
    begin()
    state = serving_state()
    # The declared size before auth or reading (waitress caps what it reads: lmref.serving.server).
    if (request.content_length or 0) > state.config.max_content_length:
        raise APIError(413, "request body too large", code="request_too_large")
    if request.path in PUBLIC_PATHS:
        return None
    principal = state.authenticate(request.headers.get("Authorization"))
    if principal is None:
        raise APIError(
            401,
            "Incorrect or missing API key (Authorization: Bearer <key>)",
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scope = scope_for(request.path)
    if not principal.may(scope):
        raise APIError(
            403,
            f"this key lacks the '{scope}' scope that {request.path} needs",
            "permission_error",
            code="insufficient_scope",
        )
    request.environ[PRINCIPAL] = principal
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


def count(response: Response) -> Response:
    """After every route: ``lmref:http_requests`` by route and status; a counted request leaves
    the in-flight count when its response (a stream too) is closed; the ``X-Request-ID`` header
    and, at close, the access line."""
    state = serving_state()
    finish(response, state.config.log_prompts)
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    state.http_requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
    if request.environ.pop("lmref.counted", False):
        response.call_on_close(state.leave)
    return response


def install(app: Flask) -> None:
    """Register the guard, the counter and the error handlers on ``app``."""
    app.register_error_handler(APIError, error_response)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    app.before_request(guard)
    app.after_request(count)
