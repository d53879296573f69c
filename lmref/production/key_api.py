"""A server app on the Redis key store: keys with scopes, per-key limits and usage, admin routes.

``register_key_store(app, url)`` makes ``lmref.production.keys.KeyStore`` the app's
authenticator (the guard of ``lmref.serving.guards`` then checks each key and its scope), and adds:

- before each non-public request, after the guard: the key's rate and token quota
  (``lmref.production.limits``); over either, a 429 in OpenAI's shape with ``Retry-After``;
- when a response that was let in closes (a stream's too): its prompt and completion tokens
  (``request.environ["lmref.usage"]``) are charged to the key's quota and usage;
- ``GET /v1/admin/keys`` (the records, never a secret) and ``GET /v1/admin/usage`` (each key's
  requests, prompt_tokens, completion_tokens and refused, by key_id and owner): the guard lets
  only keys with the ``admin`` scope reach ``/v1/admin/``.

Redis down: authentication and limits answer 503 (fail closed); a charge that fails on close is
logged (by key_id) and lost.

Usage::

    from lmref.production.key_api import register_key_store

    app = create_app(config)                      # lmref.serving.app
    register_key_store(app, "redis://127.0.0.1:6379/0")

``python -m lmref.serve --key-store-url redis://HOST:6379/0`` does this for every replica; keys are
made with ``python -m lmref.keys create --owner acme --scopes inference``.
"""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, Flask, Response, current_app, request

from lmref.production.keys import KeyStore, store_unavailable
from lmref.production.limits import Limiter, too_many
from lmref.serving.audit import USAGE
from lmref.serving.current import PRINCIPAL
from lmref.serving.state import EXTENSION

log = logging.getLogger("lmref.production.key_api")
KEYS_EXTENSION = "lmref.keys"  # app.extensions: (KeyStore, Limiter)
LIMITED = "lmref.limited"  # request.environ: the Principal a request was let in as

key_admin = Blueprint("key_admin", __name__)


def _parts() -> tuple[KeyStore, Limiter]:
    return current_app.extensions[KEYS_EXTENSION]


def enforce_limits() -> None:
    """Before the route (the guard has run): refuse a key over its rate or token quota."""
    principal = request.environ.get(PRINCIPAL)  # None on a public path: the guard let it by
    if principal is None:
        return None
    try:
        refused = _parts()[1].check(principal)
    except redis.RedisError as exc:
        raise store_unavailable() from exc
    if refused:
        raise too_many(*refused)
    request.environ[LIMITED] = principal
    return None


def charge_on_close(response: Response) -> Response:
    """After the route: when the response closes, charge the tokens it cost to its key."""
    principal = request.environ.pop(LIMITED, None)
    if principal is None:
        return response
    environ, limiter = request.environ, _parts()[1]

    def charge() -> None:
        cost = environ.get(USAGE) or {}
        try:
            limiter.charge(
                principal.key_id,
                principal.tokens_per_min,
                cost.get("prompt_tokens", 0),
                cost.get("completion_tokens", 0),
            )
        except redis.RedisError as exc:  # the answer is already out: nothing left to refuse
            log.warning("usage of %s not charged: %s", principal.key_id, exc)

    response.call_on_close(charge)
    return response


@key_admin.get("/v1/admin/keys")
def list_keys():
    store, _ = _parts()
    try:
        records = store.list()
    except redis.RedisError as exc:
        raise store_unavailable() from exc
    return {"object": "list", "data": [r.public() for r in records]}


@key_admin.get("/v1/admin/usage")
def usage():
    store, limiter = _parts()
    try:
        records = store.list()
        counters = limiter.usages([r.key_id for r in records])
    except redis.RedisError as exc:
        raise store_unavailable() from exc
    data = [
        {"key_id": r.key_id, "owner": r.owner, "revoked": r.revoked, **counters[r.key_id]}
        for r in records
    ]
    return {"object": "list", "data": data}


def register_key_store(app: Flask, url: str) -> KeyStore:
    """Serve ``app`` with the keys of the Redis at ``url``: its authenticator, limits, usage
    and admin routes (see the module's docstring). Returns the store."""
    store = KeyStore(url)
    app.extensions[EXTENSION].authenticator = store
    app.extensions[KEYS_EXTENSION] = (store, Limiter(store.redis))
    app.before_request(enforce_limits)  # registered after the guard (create_app): runs after it
    app.after_request(charge_on_close)
    app.register_blueprint(key_admin)
    return store
