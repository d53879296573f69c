"""The model server under waitress: in a thread of this process (tests, notebooks, benchmarks)
or in the foreground until SIGTERM/SIGINT (``python -m lmref.serve``), draining on the way out.

waitress's own answers to requests it cannot parse (431, 413, bad chunked encoding ...) come
in the OpenAI error shape too. Building the app (and the production services it may carry) is
the caller's: ``lmref.serve.build_app``.

Usage::

    from lmref.serving.app import create_app
    from lmref.serving.server import run_until_signal, start_in_thread

    handle = start_in_thread(create_app(config), config)   # port: config.port, or port=0
    print(handle.url); handle.stop()                          # drains, then closes
    exit_code = run_until_signal(create_app(config), config)  # foreground, until SIGTERM
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

from flask import Flask
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from lmref.serving.audit import HEADER, request_id_from
from lmref.serving.config import ServingConfig
from lmref.serving.schema import HTTP_ERRORS, APIError
from lmref.serving.state import EXTENSION, ServingState

log = logging.getLogger("lmref.serve")


class _JSONErrorTask(ErrorTask):
    """waitress's own answers to requests it cannot parse (431 headers too large, 413 body too
    large, bad chunked encoding ...) in the OpenAI error shape instead of plain text."""

    def execute(self) -> None:
        error = self.request.error
        type_, code = HTTP_ERRORS.get(error.code, ("invalid_request_error", None))
        api_error = APIError(error.code, f"{error.reason}: {error.body}", type_, code=code)
        body = json.dumps(api_error.body()).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        # Flask never sees this request: its id is given here (waitress's header names).
        rid = request_id_from(getattr(self.request, "headers", {}).get("X_REQUEST_ID"))
        self.response_headers.append((HEADER, rid))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JSONErrorChannel(HTTPChannel):
    error_task_class = _JSONErrorTask


def _run_waitress(server, stop: threading.Event) -> None:
    """waitress's loop, polled until ``stop`` is set, then everything closed in this thread:
    the listener, the worker threads and open keep-alive connections (a single-socket server's
    own close() leaves those, and closing sockets from another thread races the poll)."""
    from waitress import wasyncore

    while not stop.is_set():
        wasyncore.loop(timeout=0.1, map=server._map, count=1)
    server.close()
    server.task_dispatcher.shutdown(timeout=5)
    wasyncore.close_all(server._map, ignore_all=True)


def waitress_server(app: Flask, config: ServingConfig, port: int):
    """A waitress server for ``app`` on ``config.host:port`` (not yet running)."""
    from waitress.server import create_server

    # threads: every waiting or streaming request holds a waitress thread, so the batcher can
    # only batch as many requests as there are threads. channel_request_lookahead lets waitress
    # notice a client that disconnected while its request runs.
    # connection_limit: idle keep-alive connections count too; at the limit waitress stops
    # accepting, and new clients would wait for old idle ones to time out.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a queue is normal under load
    # max_request_body_size: waitress refuses a larger body from its Content-Length (or while
    # reading a chunked one), before it buffers it; its default is 1 GiB.
    server = create_server(
        app,
        host=config.host,
        port=port,
        threads=config.server_threads,
        channel_request_lookahead=1,
        expose_tracebacks=False,
        ident="lmref",
        connection_limit=max(1000, 4 * config.server_threads),
        max_request_body_size=config.max_content_length,
    )
    server.channel_class = _JSONErrorChannel
    return server


def start_grpc(app: Flask, config: ServingConfig):
    """The gRPC server beside waitress (``config.grpc_port``; None: none), on the app's state
    and, with a key store, its limits (``lmref.production.key_api`` keeps them in the app)."""
    if config.grpc_port is None:
        return None
    from lmref.serving.grpc_server import GrpcServer  # grpcio: only when asked for

    keys = app.extensions.get("lmref.keys")  # (KeyStore, Limiter) when a key store is on
    grpc_server = GrpcServer(
        app.extensions[EXTENSION],
        config.host,
        config.grpc_port,
        config.server_threads,
        keys[1] if keys else None,
    )
    grpc_server.start()
    return grpc_server


def _drain(state: ServingState, timeout: float, grpc_server=None) -> bool:
    """New requests get 503 (gRPC: UNAVAILABLE), in-flight ones of both get ``timeout`` to
    finish; then the engines close, and the gRPC server."""
    state.draining.set()
    drained = state.wait_idle(timeout)
    state.close()
    if not drained:
        state.wait_idle(2.0)  # aborted streams still send their error event
    if grpc_server is not None:
        grpc_server.stop(grace=2.0)
    return drained


class ServerHandle:
    """A waitress server running in a thread of this process (tests, notebooks, benchmarks)."""

    def __init__(self, app: Flask, server, thread: threading.Thread, stop: threading.Event):
        self.app, self.server, self.thread, self._stop = app, server, thread, stop
        self.state: ServingState = app.extensions[EXTENSION]
        self.url = f"http://127.0.0.1:{server.effective_port}"
        self.grpc = start_grpc(app, self.state.config)  # None unless config.grpc_port is set
        self.grpc_target = f"127.0.0.1:{self.grpc.port}" if self.grpc else None

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.state.ready:
            errors = list(self.state.load_errors().values())
            if errors:
                raise RuntimeError(f"model failed to load: {errors}")
            if time.monotonic() > deadline:
                raise TimeoutError("models did not load in time")
            time.sleep(0.05)

    def stop(self, drain_timeout: float | None = None) -> bool:
        """Drain (new requests get 503), wait for in-flight ones, then close. True when drained."""
        timeout = self.state.config.drain_timeout_s if drain_timeout is None else drain_timeout
        drained = _drain(self.state, timeout, self.grpc)
        self._stop.set()
        self.thread.join(timeout=10)
        return drained


def start_in_thread(
    app: Flask, config: ServingConfig, port: int | None = None, wait: bool = True
) -> ServerHandle:
    """Serve ``app`` with waitress in a background thread on ``config.host`` (``port`` None:
    ``config.port``; 0: a free one). ``wait``: until the models are loaded."""
    server = waitress_server(app, config, config.port if port is None else port)
    stop = threading.Event()
    thread = threading.Thread(
        target=_run_waitress, args=(server, stop), name="waitress", daemon=True
    )
    thread.start()
    handle = ServerHandle(app, server, thread, stop)
    if wait:
        handle.wait_ready()
    return handle


def run_until_signal(app: Flask, config: ServingConfig) -> int:
    """Serve ``app`` until SIGTERM/SIGINT, then drain for ``config.drain_timeout_s``. Prints one
    JSON line with the URL once listening and one when stopped. Returns 1 when a model failed
    to load (a server short of a configured model is misconfigured), else 0."""
    state: ServingState = app.extensions[EXTENSION]
    server = waitress_server(app, config, config.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop_loop = threading.Event()
    thread = threading.Thread(
        target=_run_waitress, args=(server, stop_loop), name="waitress", daemon=True
    )
    thread.start()
    url = f"http://{config.host}:{server.effective_port}"
    grpc_server = start_grpc(app, config)
    ready = {"event": "listening", "url": url, "pid": os.getpid()}
    if grpc_server is not None:
        ready["grpc"] = f"{config.host}:{grpc_server.port}"
    print(json.dumps(ready), flush=True)
    failed: dict = {}
    while not stop.wait(0.5) and not failed:
        failed = state.load_errors()
    if failed:
        log.error("model failed to load, stopping: %s", failed)
    drained = _drain(state, config.drain_timeout_s, grpc_server)
    stop_loop.set()
    thread.join(timeout=10)
    print(json.dumps({"event": "stopped", "drained": drained}), flush=True)
    return 1 if failed else 0
