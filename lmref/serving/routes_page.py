"""``GET /``: the chat page (``lmref/serving/static/chat.html``: streams from the chat route,
picks a model version, shows TTFT and tokens/s; asks for an API key when auth is on).

Usage::

    from lmref.serving.routes_page import page

    app.register_blueprint(page)     # create_app does this
"""

from __future__ import annotations

import functools
import importlib.resources

from flask import Blueprint, Response

page = Blueprint("page", __name__)


@functools.cache
def chat_page() -> str:
    """The page's HTML, read from the package once."""
    return importlib.resources.files("lmref.serving").joinpath("static/chat.html").read_text()


@page.get("/")
def index():
    return Response(chat_page(), mimetype="text/html")
