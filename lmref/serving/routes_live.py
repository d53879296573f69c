"""The model server's routes that change what it serves while it runs (the ``admin`` scope:
the guard lets only such keys reach ``/v1/admin/``): ``POST /v1/admin/models`` {"name",
"model", optional ``ModelSpec`` settings} loads a version (202: it joins routing once loaded),
``DELETE /v1/admin/models/{name}`` unloads one (409 while an alias routes to it),
``PUT /v1/admin/aliases/{alias}`` {"weights": {...}} sets an alias's split, and
``GET /v1/admin/config`` shows the wanted document (with its version) and what this server
runs. The mechanics are ``lmref.serving.live``; with a shared store
(``lmref.production.live_config``) a change sent to one replica reaches them all.

Usage::

    from lmref.serving.routes_live import live_admin

    app.register_blueprint(live_admin)     # create_app does this
"""

from __future__ import annotations

from flask import Blueprint, current_app

from lmref.serving.live import LiveConfig
from lmref.serving.routes_completions import parse_json
from lmref.serving.schema import bad

LIVE_EXTENSION = "lmref.live"  # app.extensions: the server's LiveConfig
live_admin = Blueprint("live_admin", __name__)


def live_config() -> LiveConfig:
    return current_app.extensions[LIVE_EXTENSION]


@live_admin.get("/v1/admin/config")
def config():
    return live_config().status()


@live_admin.post("/v1/admin/models")
def load_model():
    body = parse_json()
    name, spec = body.get("name"), {k: v for k, v in body.items() if k not in ("name", "model")}
    if not isinstance(body.get("model"), str):
        raise bad("'model' must be a string: a folder or hub id", "model")
    live = live_config()
    doc = live.edit(live.add_model, name, {"path": body["model"], **spec})
    return {"name": name, "status": "loading", "version": doc["version"]}, 202


@live_admin.delete("/v1/admin/models/<path:name>")
def unload_model(name: str):
    live = live_config()
    doc = live.edit(live.remove_model, name)
    return {"name": name, "status": "unloading", "version": doc["version"]}, 202


@live_admin.put("/v1/admin/aliases/<path:alias>")
def set_alias(alias: str):
    body = parse_json()
    live = live_config()
    doc = live.edit(live.set_alias, alias, body.get("weights"))
    return {"alias": alias, "weights": doc["aliases"][alias], "version": doc["version"]}
