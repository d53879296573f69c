"""Changing what a running server serves, without a restart: load a model version, unload one,
set an alias's weights. The wanted configuration is one document (``{"version", "models",
"aliases"}``) in a ``ConfigStore``; ``LiveConfig.reconcile`` brings the engines and aliases of one
``ServingState`` to it. Here the store is the server's own memory (``LocalConfigStore``: a change
reaches this one server); ``lmref.production.live_config`` keeps the document in Redis, where
every replica's follower thread reads it.

No request fails because of a change: a new version joins ``state.engines`` (and so routing)
only once loaded; an alias changes in one assignment (a request sees the old weights or the
new, never half); a version leaves routing first, then its queued and running requests finish,
then its worker stops and its model is dropped. Dicts are replaced, never changed in place, so
a reader iterating one is never disturbed.

Usage::

    from lmref.serving.live import LiveConfig

    live = LiveConfig(state)                    # state: lmref.serving.state.ServingState
    live.edit(live.add_model, "v2", {"path": "artifacts/v2"})   # APIError 400/404/409 if wrong
    live.edit(live.set_alias, "prod", {"v1": 0.5, "v2": 0.5})
    live.edit(live.remove_model, "v1")          # 409 while an alias routes to it
    live.status()                               # {"version", "applied_version", "models", ...}
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from lmref.serving.engine import Engine, ModelSpec
from lmref.serving.schema import APIError, bad
from lmref.serving.state import ServingState, model_not_found

log = logging.getLogger("lmref.serving.live")
SPEC_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)} - {"name"}
DRAIN_STABLE_S = 0.5  # a version is idle once nothing ran for this long (covers resolve->submit)


class ConfigStore(Protocol):
    """Where the wanted configuration document lives."""

    def read(self) -> dict | None: ...

    def update(self, change: Callable[[dict], None]) -> dict:
        """Apply ``change`` to a copy of the document and store it with ``version`` + 1,
        atomically; ``change`` raises (an APIError) to refuse. Returns the new document."""
        ...


class LocalConfigStore:
    """The document in this process's memory: changes reach this one server."""

    def __init__(self, doc: dict) -> None:
        self._doc, self._lock = doc, threading.Lock()

    def read(self) -> dict:
        return self._doc

    def update(self, change: Callable[[dict], None]) -> dict:
        with self._lock:
            doc = copy.deepcopy(self._doc)
            change(doc)
            doc["version"] = self._doc["version"] + 1
            self._doc = doc
            return doc


def conflict(message: str, param: str | None = None) -> APIError:
    return APIError(409, message, "invalid_request_error", param=param, code="conflict")


def document_of(state: ServingState) -> dict:
    """The configuration a server was started with, as a version-1 document."""
    models = {}
    for name, engine in state.engines.items():
        spec = dataclasses.asdict(engine.spec)
        spec.pop("name")
        models[name] = spec
    return {
        "version": 1,
        "models": models,
        "aliases": copy.deepcopy(state.config.aliases),
        "default_model": state.default_model,
    }


class LiveConfig:
    """Brings one ``ServingState`` to the wanted document, and validates changes to it."""

    def __init__(self, state: ServingState, store: ConfigStore | None = None) -> None:
        self.state = state
        self.store: ConfigStore = store or LocalConfigStore(document_of(state))
        self.applied_version = 0 if store else 1  # its own document: what it was started with
        self.loading: dict[str, Engine] = {}  # versions loading, not yet routed to
        self.draining: dict[str, Engine] = {}  # versions left routing, finishing their requests
        self.failed: dict[str, str] = {}  # version -> why it failed to load
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ changes to the document
    def edit(self, change: Callable[..., None], *args: Any) -> dict:
        """Apply ``change(doc, *args)`` to the store's document, then to this server."""
        doc = self.store.update(lambda d: change(d, *args))
        self.reconcile(doc)
        return doc

    def add_model(self, doc: dict, name: Any, spec: Any) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise bad("'name' must be a non-empty string without '/'", "name")
        if name in doc["models"] or name in doc["aliases"]:
            raise conflict(f"'{name}' is already a served version or an alias", "name")
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise bad("'model' must be a string: a folder or hub id", "model")
        unknown = sorted(set(spec) - SPEC_FIELDS)
        if unknown:
            raise bad(f"unknown model settings {', '.join(unknown)}", unknown[0])
        try:
            ModelSpec(name, **spec)
        except TypeError as exc:
            raise bad(f"bad model settings: {exc}", "model") from None
        from lmref.serving.integrity import IntegrityError, check_model

        try:  # names and sizes: a mistyped path is a 400 now, not a load error later
            check_model(spec["path"], spec.get("allow_unmanifested", False), hashes=False)
        except (IntegrityError, OSError, ValueError) as exc:
            raise bad(f"model '{name}' cannot be served: {exc}", "model") from None
        doc["models"][name] = spec

    def remove_model(self, doc: dict, name: str) -> None:
        if name not in doc["models"]:
            raise model_not_found(name)
        routed = sorted(a for a, split in doc["aliases"].items() if name in split)
        if routed:
            raise conflict(
                f"model '{name}' is in use by alias {', '.join(routed)}: route the alias "
                "elsewhere first",
                "model",
            )
        if name == doc.get("default_model"):
            raise conflict(f"model '{name}' is the default model (requests naming none)", "model")
        del doc["models"][name]

    def set_alias(self, doc: dict, alias: str, weights: Any) -> None:
        """As ``ServingConfig.validate``: known versions, weights > 0; and ready on this server."""
        if alias in doc["models"]:
            raise conflict(f"alias '{alias}' has the name of a served model", "alias")
        if not isinstance(weights, dict) or not weights:
            raise bad("'weights' must be an object of version -> weight, not empty", "weights")
        for version, weight in weights.items():
            if version not in doc["models"]:
                raise APIError(
                    404,
                    f"alias '{alias}' routes to '{version}', not a served model (served: "
                    f"{', '.join(doc['models'])})",
                    "not_found_error",
                    param="weights",
                    code="model_not_found",
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise bad(f"the weight of '{version}' must be a number", "weights")
            if not (weight > 0 and math.isfinite(weight)):
                raise bad(f"the weight of '{version}' must be > 0", "weights")
            engine = self.state.engines.get(version)
            if engine is None or not engine.ready:
                raise conflict(f"model '{version}' is not ready here yet: retry", "weights")
        doc["aliases"][alias] = {v: float(w) for v, w in weights.items()}

    # ---------------------------------------------------------------- bringing the server to it
    def reconcile(self, doc: dict | None = None) -> bool:
        """Apply the document (default: the store's) to this server; True once fully applied
        (a version still loading, and the aliases that route to it, wait for another call)."""
        doc = self.store.read() if doc is None else doc
        if doc is None:
            return False
        with self._lock:
            if doc["version"] < self.applied_version:
                return True  # an older read than what is applied already
            state, wanted = self.state, doc["models"]
            for name, spec in wanted.items():
                if name not in state.engines and name not in self.loading:
                    if name not in self.failed:
                        self._load(name, spec)
            aliases, done = {}, True
            for alias, split in doc["aliases"].items():
                if all(v in state.engines and state.engines[v].ready for v in split):
                    aliases[alias] = dict(split)
                else:  # keep what it routed to until its versions are ready here
                    done = False
                    if alias in state.config.aliases:
                        aliases[alias] = state.config.aliases[alias]
            state.config.aliases = aliases  # one assignment: a request sees old or new
            routed = {v for split in aliases.values() for v in split}
            for name in [n for n in state.engines if n not in wanted and n not in routed]:
                self._unload(name)
            self.failed = {n: why for n, why in self.failed.items() if n in wanted}
            done = done and not self.loading and set(state.engines) == set(wanted)
            if done:
                self.applied_version = doc["version"]
            return done

    def _load(self, name: str, spec: dict) -> None:
        state = self.state
        engine = Engine(ModelSpec(name, **spec), state.metrics, state.cache)
        self.loading[name] = engine
        engine.start()  # the one loader, in the engine's worker thread

        def joined() -> None:
            engine.loaded.wait()
            with self._lock:
                self.loading.pop(name, None)
                if engine.load_error:
                    self.failed[name] = engine.load_error
                    log.error("version %s failed to load: %s", name, engine.load_error)
                else:  # routable from now on
                    state.engines = {**state.engines, name: engine}
                    log.info("version %s loaded", name)
            self.reconcile()

        threading.Thread(target=joined, name=f"live-load-{name}", daemon=True).start()

    def _unload(self, name: str) -> None:
        engine = self.state.engines[name]
        self.state.engines = {n: e for n, e in self.state.engines.items() if n != name}
        self.draining[name] = engine
        timeout = self.state.config.drain_timeout_s

        def drain() -> None:
            deadline, idle_since = time.monotonic() + timeout, None
            while time.monotonic() < deadline:
                if engine.busy_rows:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= DRAIN_STABLE_S:
                    break
                time.sleep(0.05)
            engine.close(abort_message=None)  # running rows (past the deadline) still finish
            freed = engine.release(timeout)
            with self._lock:
                self.draining.pop(name, None)
            log.info("version %s unloaded (memory released: %s)", name, freed)

        threading.Thread(target=drain, name=f"live-unload-{name}", daemon=True).start()

    def status(self) -> dict:
        """The wanted document and what this server runs: ``GET /v1/admin/config``."""
        doc = self.store.read() or {}
        state = self.state
        models = {n: "ready" if e.ready else "loading" for n, e in state.engines.items()}
        models |= {n: "loading" for n in self.loading}
        models |= {n: "unloading" for n in self.draining}
        models |= {n: "failed: " + why for n, why in self.failed.items()}
        return {
            "version": doc.get("version"),
            "applied_version": self.applied_version,
            "config": doc,
            "serving": {"models": models, "aliases": state.config.aliases},
        }
