"""Who is asking: an API key becomes a ``Principal`` (key id, owner, scopes, limits), and each
route needs one scope. No web framework here: the Flask guard (``lmref.serving.guards``), the
Batch worker and a key store (``lmref.production.keys``) all speak these types.

A key is never kept or logged as itself: ``key_id`` is the public name of a key (safe in an
access log), ``owner`` the tenant whose files, batches and cached answers are its own.

Usage::

    from lmref.serving.auth import StaticKeys, scope_for

    keys = StaticKeys(["sk-a", "sk-b"])        # each key its own tenant, every scope
    who = keys.authenticate("sk-a")            # Principal(key_id='key_...', owner='key_...', ...)
    scope_for("/v1/batches")                   # 'batch'
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Protocol

SCOPES = ("inference", "batch", "admin")  # what a key may do: run models, use the Batch API, manage


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``rate_per_s`` / ``tokens_per_min``: its limits (None: none)."""

    key_id: str
    owner: str
    scopes: frozenset[str] = field(default_factory=lambda: frozenset(SCOPES))
    rate_per_s: float | None = None
    tokens_per_min: int | None = None

    def may(self, scope: str) -> bool:
        return scope in self.scopes


# No keys configured (a loopback demo): everyone is this one tenant, with every scope.
ANONYMOUS = Principal("anonymous", "anonymous")


class Authenticator(Protocol):
    """Anything that turns a presented key into a Principal (None: not a valid key)."""

    def authenticate(self, token: str) -> Principal | None: ...


def key_digest(token: str) -> bytes:
    """The sha256 of a key: what is stored and compared, never the key itself."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


def key_id_of(token: str) -> str:
    """A key's public id, derived from its digest: names a static key in logs without it."""
    return "key_" + key_digest(token).hex()[:12]


class StaticKeys:
    """Keys given on the command line or in env ``LMREF_API_KEYS``: each its own tenant, with
    every scope and no limits (a key store gives scopes and limits: ``lmref.production.keys``)."""

    def __init__(self, keys: list[str]):
        # Digests, so compare_digest compares equal-length values and no key sits in memory.
        self.entries = [(key_digest(k), Principal(key_id_of(k), key_id_of(k))) for k in keys]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def authenticate(self, token: str) -> Principal | None:
        presented, found = key_digest(token), None
        for digest, principal in self.entries:  # no early exit: time does not depend on which
            if secrets.compare_digest(digest, presented):
                found = principal
        return found


def bearer_token(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header, or None."""
    if not header or not header.startswith("Bearer "):
        return None
    return header[7:].strip() or None


# The scope each path needs; the first prefix that matches wins, inference otherwise.
ROUTE_SCOPES = (("/v1/files", "batch"), ("/v1/batches", "batch"), ("/v1/admin", "admin"))


def scope_for(path: str) -> str:
    """The scope a request to ``path`` needs."""
    for prefix, scope in ROUTE_SCOPES:
        if path == prefix or path.startswith(prefix + "/"):
            return scope
    return "inference"
