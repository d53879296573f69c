"""The serving state of the Flask app handling the current request (``app.extensions["lmref"]``,
put there by ``lmref.serving.app.create_app``), and its caller (``current_principal``): what the
blueprints read instead of closures.

Usage::

    from lmref.serving.current import serving_state

    @blueprint.get("/ready")
    def ready():
        return {"ready": serving_state().ready}
"""

from __future__ import annotations

from flask import current_app, request

from lmref.serving.auth import ANONYMOUS, Principal
from lmref.serving.state import EXTENSION, ServingState

PRINCIPAL = "lmref.principal"  # the request.environ key the guard puts the caller under


def serving_state() -> ServingState:
    """The state of the app handling the current request."""
    return current_app.extensions[EXTENSION]


def current_principal() -> Principal:
    """The caller of the current request, as the guard authenticated it (``ANONYMOUS`` on a
    public path, or with no keys configured)."""
    return request.environ.get(PRINCIPAL, ANONYMOUS)
