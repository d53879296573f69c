"""The serving state of the Flask app handling the current request (``app.extensions["lmref"]``,
put there by ``lmref.serving.app.create_app``): what the blueprints read instead of closures.

Usage::

    from lmref.serving.current import serving_state

    @blueprint.get("/ready")
    def ready():
        return {"ready": serving_state().ready}
"""

from __future__ import annotations

from flask import current_app

from lmref.serving.state import EXTENSION, ServingState


def serving_state() -> ServingState:
    """The state of the app handling the current request."""
    return current_app.extensions[EXTENSION]
