"""The model server's audit trail: a request id on every request and response, and one JSON
access-log line per request, written when its response closes (a stream's after its last byte).

- **Request id**: a client's ``X-Request-ID`` is kept when it is a safe token (1-128 characters
  of ``A-Za-z0-9._:-``, starting with a letter or digit); anything else is replaced, never echoed,
  so a header cannot forge or break a log line. Without one the server makes ``req_<uuid4 hex>``
  (OpenAI's shape). It is in ``request.environ[REQUEST_ID]`` (``current_request_id()``), goes back
  as the ``X-Request-ID`` response header (errors and streams too), and reaches the engine as a
  plain value on its ``Job`` (``lmref.serving.service.submit``).
- **Access log**: logger ``lmref.access`` (``ACCESS``), one line per request, the message a JSON
  object: ``ts`` (UTC, when the response closed), ``request_id``, ``key_id`` and ``owner`` (the
  key's public name, never the key nor the Authorization header), ``method``, ``path`` (no query
  string: it can carry secrets), ``model`` (the served version, when a route resolved one),
  ``status``, ``prompt_tokens``, ``completion_tokens``, ``latency_ms``. The prompt (``prompt``:
  the request's prompt or messages) only with ``ServingConfig.log_prompts``: privacy by default.
  Probes (``/health``, ``/ready``, ``/metrics``) are not logged: a kubelet asks every few seconds,
  they carry no key, and ``lmref:http_requests`` counts them.
- ``configure_access_log(target)``: where the lines go in a server process (``-``: stdout, for a
  container's log shipper; a path: that file; ``off``), message only, so each line is JSON.
  Without it they go wherever the ``lmref.access`` logger propagates (tests: ``caplog``).

Usage::

    from lmref.serving.audit import begin, configure_access_log, finish

    app.before_request(begin)      # lmref.serving.guards does both: the id comes before the key
    app.after_request(finish)      # check, so a 401 carries one too
    configure_access_log("-")      # python -m lmref.serve (--access-log PATH)
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import Response, request

from lmref.serving.current import PRINCIPAL

HEADER = "X-Request-ID"
REQUEST_ID = "lmref.request_id"  # request.environ keys: the id, and what the access line reads
STARTED = "lmref.started"
MODEL = "lmref.model"  # the served version a route resolved
PROMPT = "lmref.prompt"  # the prompt, put there only when ServingConfig.log_prompts is on
# request.environ key of what a request cost, {"prompt_tokens", "completion_tokens"}, set by the
# completion routes: final when the response closes (a stream's too), where the access log and
# per-key usage (lmref.production.key_api) read it.
USAGE = "lmref.usage"
NOT_LOGGED = frozenset({"/health", "/ready", "/metrics"})
ACCESS = logging.getLogger("lmref.access")
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_PATH = 256  # a path is the client's text: bounded in the log


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def request_id_from(header: str | None) -> str:
    """The client's id when it is a safe token, else a new one (never the raw header)."""
    return header if header is not None and SAFE_ID.fullmatch(header) else new_request_id()


def current_request_id() -> str:
    """The id of the request being handled (the guard set it)."""
    return request.environ.get(REQUEST_ID) or new_request_id()


def begin() -> None:
    """Before everything else: the request's id and start time."""
    request.environ[REQUEST_ID] = request_id_from(request.headers.get(HEADER))
    request.environ[STARTED] = time.perf_counter()


def finish(response: Response, log_prompts: bool = False) -> Response:
    """After the route (or its error): the ``X-Request-ID`` header, and the access line written
    when the response closes, so a stream's tokens are final."""
    environ = request.environ
    rid = environ.get(REQUEST_ID) or new_request_id()
    response.headers[HEADER] = rid
    if request.path in NOT_LOGGED:
        return response
    principal = environ.get(PRINCIPAL)
    # Read now, while the request context is there; tokens and the end time at close.
    fixed = {
        "request_id": rid,
        "key_id": principal.key_id if principal else None,
        "owner": principal.owner if principal else None,
        "method": request.method,
        "path": request.path[:MAX_PATH],
    }
    status = response.status_code
    started = environ.get(STARTED, time.perf_counter())
    response.call_on_close(lambda: write(environ, fixed, status, started, log_prompts))
    return response


def write(
    environ: dict, fixed: dict[str, Any], status: int, started: float, log_prompts: bool
) -> None:
    """One access line: the message is the JSON object; it is on the record as ``access`` too,
    for a handler that ships structured records."""
    usage = environ.get(USAGE) or {}
    entry = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        **fixed,
        "model": environ.get(MODEL),
        "status": status,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    if log_prompts and PROMPT in environ:
        entry["prompt"] = environ[PROMPT]
    # ASCII only: no character in a prompt (U+2028, NEL) can look like a line end to a shipper.
    ACCESS.info(json.dumps(entry, default=str), extra={"access": entry})


def configure_access_log(target: str = "-") -> logging.Handler | None:
    """Send ``lmref.access`` to stdout (``-``) or a file (a path), one JSON object a line and
    nothing else, not also to the root logger's handlers; ``off``: not written. Call once, in a
    server process (``python -m lmref.serve``); returns the handler."""
    ACCESS.propagate = False
    if target == "off":
        ACCESS.disabled = True
        return None
    handler = (
        logging.StreamHandler(sys.stdout)
        if target == "-"
        else logging.FileHandler(target, encoding="utf-8")
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    ACCESS.addHandler(handler)
    ACCESS.setLevel(logging.INFO)
    return handler
