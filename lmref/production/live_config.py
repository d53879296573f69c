"""The live configuration shared by every replica: one JSON document in Redis (what versions to
serve, the aliases' weights, a version counter), changed atomically by any replica's admin API
(``lmref.serving.routes_live``) or by a tool, and followed by each replica.

``RedisConfigStore`` keeps the document under one key; ``update`` is an optimistic transaction
(WATCH / MULTI: a concurrent writer makes it retry, so two changes never overwrite each other,
and each bumps ``version``). ``ConfigFollower`` is a thread in each replica that reads the
document every ``poll_s`` and, when its version moved or this replica has not applied it yet,
hands it to ``lmref.serving.live.LiveConfig.reconcile`` (loads, unloads, alias weights). A
poll rather than pub/sub: a replica that was down or slow catches up on its next read, and one
read every 0.5 s is nothing to Redis. Redis unreachable: the replica keeps serving what it has
and logs the failure; the admin API answers 503.

Usage::

    from lmref.production.live_config import register_config_store

    app = create_app(config)                                  # lmref.serving.app
    register_config_store(app, "redis://127.0.0.1:6379/0")    # seeds the document if none

``python -m lmref.serve --config-store-url redis://HOST:6379/0`` (env LMREF_CONFIG_STORE_URL)
does this for every replica.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Callable

import redis
from flask import Flask

from lmref.production.connections import STORE_ERRORS, redis_client
from lmref.serving.live import LiveConfig, document_of
from lmref.serving.routes_live import LIVE_EXTENSION
from lmref.serving.schema import APIError
from lmref.serving.state import EXTENSION

log = logging.getLogger("lmref.production.live_config")
CONFIG_KEY = "lmref:live_config"


def store_unavailable() -> APIError:
    return APIError(
        503,
        "the configuration store is unavailable: retry",
        "service_unavailable_error",
        code="config_store_unavailable",
        headers={"Retry-After": "1"},
    )


class RedisConfigStore:
    """The document under ``key`` in the Redis at ``url``."""

    def __init__(self, url: str, key: str = CONFIG_KEY) -> None:
        self.redis, self.key = redis_client(url), key

    def read(self) -> dict | None:
        try:
            raw = self.redis.get(self.key)
        except STORE_ERRORS as exc:
            raise store_unavailable() from exc
        return None if raw is None else json.loads(raw)

    def seed(self, doc: dict) -> bool:
        """Store ``doc`` unless a document is there already (the first replica's wins)."""
        return bool(self.redis.set(self.key, json.dumps(doc), nx=True))

    def update(self, change: Callable[[dict], None]) -> dict:
        result: dict = {}

        def transaction(pipe: redis.client.Pipeline) -> None:
            raw = pipe.get(self.key)
            if raw is None:
                raise APIError(503, "no live configuration in the store", code="no_config")
            old = json.loads(raw)
            doc = copy.deepcopy(old)
            change(doc)  # raises to refuse: nothing is written
            doc["version"] = old["version"] + 1
            pipe.multi()
            pipe.set(self.key, json.dumps(doc))
            result["doc"] = doc

        try:
            self.redis.transaction(transaction, self.key)
        except STORE_ERRORS as exc:
            raise store_unavailable() from exc
        return result["doc"]


class ConfigFollower:
    """A thread that applies the store's document to one replica every ``poll_s``."""

    def __init__(self, live: LiveConfig, poll_s: float = 0.5) -> None:
        self.live, self.poll_s = live, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-config", daemon=True)

    def start(self) -> ConfigFollower:
        self._thread.start()
        return self

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                doc = self.live.store.read()
                if doc is not None and doc["version"] != self.live.applied_version:
                    self.live.reconcile(doc)
                failing = False
            except Exception:  # keep serving what we have; say so once per outage
                if not failing:
                    log.exception("following the live configuration failed")
                failing = True
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def register_config_store(app: Flask, url: str, poll_s: float = 0.5) -> ConfigFollower:
    """Make the Redis at ``url`` the live configuration of ``app``'s replica: the document is
    seeded from this replica's configuration if the store has none, and a follower applies it."""
    state, live = app.extensions[EXTENSION], app.extensions[LIVE_EXTENSION]
    store = RedisConfigStore(url)
    store.seed(document_of(state))
    live.store, live.applied_version = store, 0
    follower = ConfigFollower(live, poll_s).start()
    app.extensions["lmref.live_follower"] = follower
    return follower
