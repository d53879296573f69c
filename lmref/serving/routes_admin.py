"""The model server's routes for operators and clients that list models: ``GET /health``
(liveness), ``GET /ready`` (503 until the models are loaded or while draining), ``GET /metrics``
(Prometheus), ``GET /v1/models`` and ``GET /v1/models/{id}``.

Usage::

    from lmref.serving.routes_admin import admin

    app.register_blueprint(admin)     # create_app does this
"""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmref.models.registry import registry_origin
from lmref.serving.current import serving_state
from lmref.serving.state import ServingState, model_not_found

admin = Blueprint("admin", __name__)


@admin.get("/health")
def health():
    return {"status": "ok"}


@admin.get("/ready")
def ready():
    state = serving_state()
    models = {
        n: ("ready" if e.ready else e.load_error or "loading") for n, e in state.engines.items()
    }
    if state.ready:
        return {"status": "ready", "models": models}, 200
    status = "draining" if state.draining.is_set() else "loading"
    return {"status": status, "models": models}, 503


@admin.get("/metrics")
def prometheus():
    return Response(generate_latest(serving_state().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


def model_card(state: ServingState, name: str) -> dict:
    """A served version (its context length, whether it is ready, and for a registry version its
    registered model and version) or an alias (its routes)."""
    card = {"id": name, "object": "model", "created": state.created, "owned_by": "lmref"}
    if name in state.engines:
        engine = state.engines[name]
        card = {**card, "max_model_len": engine.context_length or None, "ready": engine.ready}
        # A registry version (lmref.models.registry): which one, so an operator can tell.
        origin = registry_origin(engine.spec.path)
        return {**card, "registry": origin} if origin else card
    return {**card, "routes": state.config.aliases[name]}


@admin.get("/v1/models")
def models():
    state = serving_state()
    names = [*state.engines, *state.config.aliases]
    return {"object": "list", "data": [model_card(state, n) for n in names]}


@admin.get("/v1/models/<path:name>")
def model(name: str):
    state = serving_state()
    if name not in state.engines and name not in state.config.aliases:
        raise model_not_found(name)
    return model_card(state, name)
