"""What one server holds: the engines (one per model version), aliases, API keys, the response
cache, metrics and the drain flag. The Flask app keeps one ``ServingState`` in
``app.extensions["lmref"]`` (``lmref.serving.current.serving_state()`` inside a request); a Batch
worker holds one with no app at all, so nothing here needs a web framework.

Usage::

    from lmref.serving.state import ServingState

    state = ServingState(config)            # config: lmref.serving.config.ServingConfig
    state.start(wait=True)                  # the engines load their models
    engine = state.resolve("prod", user="alice")   # an alias picks a version, sticky per user
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from typing import Any

from prometheus_client import Counter

from lmref.serving.auth import ANONYMOUS, Authenticator, Principal, StaticKeys, bearer_token
from lmref.serving.config import ServingConfig
from lmref.serving.engine import Engine, EngineMetrics, ResponseCache
from lmref.serving.schema import APIError, bad

EXTENSION = "lmref"  # the key of the state in app.extensions


def model_not_found(name: str) -> APIError:
    """The 404 of a model that is neither a served version nor an alias."""
    return APIError(
        404,
        f"The model '{name}' does not exist",
        "not_found_error",
        param="model",
        code="model_not_found",
    )


class ServingState:
    """Engines, aliases, keys, cache, metrics and the drain flag of one server."""

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
        # Who may ask: the keys of the config by default; a key store replaces it
        # (lmref.production.keys, with scopes, owners and limits).
        self.authenticator: Authenticator = StaticKeys(config.resolved_api_keys())
        self.draining = threading.Event()
        self._inflight = 0
        self._inflight_lock = threading.Condition()
        self.created = int(time.time())

    def start(self, wait: bool = False) -> None:
        """Start every engine's worker (it loads its model); ``wait``: until all are loaded."""
        for engine in self.engines.values():
            engine.start()
        if wait:
            for engine in self.engines.values():
                engine.loaded.wait()

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines.values()) and not self.draining.is_set()

    def load_errors(self) -> dict[str, str]:
        """Model name -> why it failed to load, for the models that did."""
        return {n: e.load_error for n, e in self.engines.items() if e.load_error}

    def resolve(self, name: Any, user: Any) -> Engine:
        """The engine a request's ``model`` names (an alias: a version by weight, sticky per
        ``user``), or the APIError a client sees: 404 unknown, 503 loading or failed."""
        name = self.default_model if name is None else name
        if not isinstance(name, str):
            raise bad("'model' must be a string", "model")
        split = self.config.aliases.get(name)
        if split:
            versions, weights = list(split), list(split.values())
            if isinstance(user, str) and user:  # sticky: one user always sees one version
                digest = hashlib.sha256(user.encode("utf-8", "replace")).digest()[:8]
                point = int.from_bytes(digest, "big") / 2**64 * sum(weights)
                for name, w in zip(versions, weights):  # noqa: B007
                    if point < w:
                        break
                    point -= w
            else:
                name = random.choices(versions, weights)[0]
        engine = self.engines.get(name)
        if engine is None:
            raise model_not_found(name)
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

    def authenticate(self, header: str | None) -> Principal | None:
        """The caller an ``Authorization`` header names (None: no valid key). With no keys
        configured at all (a loopback demo), everyone is ``ANONYMOUS``."""
        if not self.authenticator:  # StaticKeys with no key (a key store is always truthy)
            return ANONYMOUS
        token = bearer_token(header)
        return None if token is None else self.authenticator.authenticate(token)

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
