"""A response cache in Redis, shared by every replica of the model server, with a TTL.

Drop-in for ``lmref.serving.engine.ResponseCache`` (same ``get`` / ``put`` / ``size``; it stores
``lmref.serving.engine.Finished`` rows as JSON, their logprobs as ``lmref.serving.sampler`` entries, hence those
two dependencies; never pickles, since a shared Redis is not a trusted source of code): replica A
answers a greedy request,
replica B serves the same request from Redis. Keys are a SHA-256 of the engine's key (model
version name, prompt, limits, stops, and the tenant unless the deployment shares the cache
across tenants: ``ServingConfig.shared_response_cache``) plus a fingerprint of the served folder's weights, so a new
version under the same name never gets the old version's answers, even one that differs in a
single late tensor. Entries expire after
``ttl_s``. Redis being down costs cache misses, not requests: errors are counted
(``lmref:shared_cache_errors``) and the request is generated as if the cache were empty.

Usage::

    from lmref.production.shared_cache import RedisResponseCache
    from lmref.serving.app import ServingConfig, create_app

    cache = RedisResponseCache("redis://127.0.0.1:6379/0", ttl_s=3600,
                               versions={"base": "artifacts/base"})
    app = create_app(ServingConfig(models=[...]), cache=cache)
    cache.register(app.extensions["lmref"].metrics.registry)   # on /metrics

``python -m lmref.serve --cache-url redis://HOST:6379/0`` does this for every replica.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import redis
from prometheus_client import CollectorRegistry, Counter

from lmref.core.hashing import sha256_of
from lmref.production.connections import redis_client
from lmref.serving.engine import Finished
from lmref.serving.sampler import TokenLogprob, TopLogprob

log = logging.getLogger("lmref.production.shared_cache")


def folder_fingerprint(path: str) -> str:
    """The sha256 of a model folder's content: every file's name and full sha256 (a manifest
    of the folder, hashed), so two folders share a fingerprint only when every byte of every
    file (weights, config, tokenizer, chat template) is the same. Read once per replica start
    (about 0.3 s for a 270 MB model). A hub id, not a folder: its name is all there is."""
    digest = hashlib.sha256()
    if not os.path.isdir(path):
        digest.update(path.encode())
        return digest.hexdigest()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and not name.startswith("."):
            digest.update(f"{name}\0{sha256_of(full)}\n".encode())
    return digest.hexdigest()


def _tokens(items: list | None) -> tuple[TokenLogprob, ...] | None:
    if items is None:
        return None
    return tuple(
        TokenLogprob(
            t["token_id"],
            t["token"],
            tuple(t["bytes"]),
            t["logprob"],
            tuple(
                TopLogprob(x["token"], tuple(x["bytes"]), x["logprob"]) for x in t.get("top", ())
            ),
        )
        for t in items
    )


def decode_finished(raw: bytes | str) -> Finished:
    """A ``Finished`` row back from its JSON (tuples and logprob entries rebuilt)."""
    fields = json.loads(raw)
    for name in ("logprobs", "prompt_logprobs"):
        if name in fields:
            fields[name] = _tokens(fields[name])
    return Finished(**fields)


class RedisResponseCache:
    """Greedy responses in Redis under ``{prefix}{sha256}``, each for ``ttl_s`` seconds."""

    def __init__(
        self,
        url: str,
        ttl_s: float = 3600.0,
        versions: dict[str, str] | None = None,
        prefix: str = "lmref:response:",
        timeout_s: float = 0.5,
    ) -> None:
        self.url, self.ttl_s, self.prefix = url, ttl_s, prefix
        self.size = 1  # the engine consults a cache whose size is > 0
        # Short timeouts: a slow Redis must not make every request slow.
        self.client = redis_client(url, timeout_s)
        self.fingerprints = {
            name: folder_fingerprint(path) for name, path in (versions or {}).items()
        }
        self.errors = Counter(
            "lmref:shared_cache_errors",
            "Redis errors of the shared response cache (each one served as a miss)",
            ["operation"],
            registry=None,
        )
        self.stored = Counter(
            "lmref:shared_cache_stores", "Responses written to the shared cache", registry=None
        )

    def register(self, registry: CollectorRegistry) -> None:
        """Export this cache's counters with the server's metrics (hits and misses are the
        engine's ``lmref:response_cache_hits`` / ``_misses``, whichever cache is used)."""
        registry.register(self.errors)
        registry.register(self.stored)

    def key(self, key: tuple) -> str:
        # key[0] is the model version name (lmref.serving.engine.Engine.submit): its weights' digest goes
        # in with it.
        version = self.fingerprints.get(key[0], "")
        return self.prefix + hashlib.sha256(repr((version, key)).encode()).hexdigest()

    def get(self, key: tuple) -> Finished | None:
        try:
            raw = self.client.get(self.key(key))
        except redis.RedisError as exc:
            self.errors.labels(operation="get").inc()
            log.warning("shared cache get failed: %s", exc)
            return None
        if raw is None:
            return None
        try:
            return decode_finished(raw)
        except (ValueError, TypeError, KeyError):  # written by an incompatible version: a miss
            return None

    def put(self, key: tuple, value: Finished) -> None:
        payload = json.dumps(dataclasses.asdict(dataclasses.replace(value, cached=False)))
        try:
            self.client.set(self.key(key), payload, ex=max(1, int(self.ttl_s)))
            self.stored.inc()
        except redis.RedisError as exc:
            self.errors.labels(operation="put").inc()
            log.warning("shared cache put failed: %s", exc)

    def ttl(self, key: tuple) -> int:
        """Seconds left for ``key`` (-2: absent), as Redis says."""
        return int(self.client.ttl(self.key(key)))
