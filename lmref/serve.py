"""Running the model server: ``python -m lmref.serve`` (one process), or in a thread (tests).

The app is ``lmref.serving.app`` (over ``lmref.serving.engine``); this module runs it under waitress.
``start_server(config)`` serves in a thread of this process and returns a handle with ``.url`` and
``.stop()``; ``python -m lmref.serve`` is the one command line. Its flags come from the fields of
``ServingConfig`` and ``ModelSpec`` (``--max-batch-size``, ``--drain-timeout-s`` ...), plus:
``--model NAME=PATH`` (repeatable; a folder, a hub id in the local cache, or a course name from
``lmref.models.loading``: ``smollm2-135m-instruct``; default: that real chat model as ``smollm2``),
``--alias NAME=V1:W1,V2:W2`` (weighted A/B), ``--unbatched NAME`` and ``--api-key KEY``
(repeatable; or env ``LMREF_API_KEYS``, a comma list), and the ``SharedServices`` of a replica:
``--cache-url redis://...`` (a response cache shared by replicas, ``lmref.production.shared_cache``) and
``--broker-url amqp://... --store-url redis://...`` (the OpenAI Batch API on Celery workers,
``lmref.production.batch``; env ``LMREF_CACHE_URL``, ``LMREF_BROKER_URL``, ``LMREF_STORE_URL``). Without keys anyone who reaches the port
may use the models: the server says so loudly at start. SIGTERM: new requests get 503, in-flight
ones get ``--drain-timeout-s`` to finish.

Usage::

    python -m lmref.serve --port 8000 --torch-threads 2          # smollm2-135m-instruct
    python -m lmref.serve --api-key sk-local --model v1=artifacts/base \\
        --model v2=artifacts/full-ft --alias prod=v1:0.9,v2:0.1

    from lmref.serve import start_server
    server = start_server(ServingConfig(models=[ModelSpec("base", "artifacts/base")]))
    print(server.url); server.stop()
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time

# OpenMP's wait policy is left to libgomp's default: an idle torch thread spins a short while,
# then sleeps. A decode step runs some 300 parallel regions, and forcing OMP_WAIT_POLICY=PASSIVE
# makes each wake a sleeping thread. Measured on the quiet 2-core AMD EPYC (serving_peer, fp32,
# 2 torch threads): passive was 1.9x slower at 1 client (9.4 vs 18.2 tokens/s) and 1.7x at 16
# (93.6 vs 159.2). On a machine shared with other busy jobs (loadavg 3-4) it went the other way
# (16 clients: 13.4 spinning, 38.0 passive): export OMP_WAIT_POLICY=PASSIVE there.
import torch
from flask import Flask
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from lmref.serving.engine import ModelSpec
from lmref.serving.app import (
    HTTP_ERRORS,
    APIError,
    ServingConfig,
    ServingState,
    create_app,
)

log = logging.getLogger("lmref.serve")
DEFAULT_MODEL = "smollm2=smollm2-135m-instruct"


@dataclasses.dataclass
class SharedServices:
    """What replicas share, all off by default; the flags default to env LMREF_CACHE_URL,
    LMREF_BROKER_URL, LMREF_STORE_URL (a container's config)."""

    cache_url: str | None = None  # redis://HOST:PORT/DB: response cache shared by replicas
    cache_ttl_s: float = 3600.0
    broker_url: str | None = None  # amqp://...: the Batch API's queue (needs store_url)
    store_url: str | None = None  # redis://...: the Batch API's files, batches and results


SHARED_ENV = {
    "cache_url": "LMREF_CACHE_URL",
    "broker_url": "LMREF_BROKER_URL",
    "store_url": "LMREF_STORE_URL",
}


def build_app(config: ServingConfig, shared: SharedServices | None = None) -> Flask:
    """``create_app`` plus the shared services asked for (imported only then: Celery and redis
    are optional dependencies)."""
    shared = shared or SharedServices()
    if bool(shared.broker_url) != bool(shared.store_url):
        raise ValueError("the Batch API needs both --broker-url and --store-url")
    cache = None
    if shared.cache_url:
        from lmref.production.shared_cache import RedisResponseCache

        cache = RedisResponseCache(
            shared.cache_url, shared.cache_ttl_s, {m.name: m.path for m in config.models}
        )
    app = create_app(config, cache=cache)
    if cache is not None:
        cache.register(app.extensions["lmref"].metrics.registry)
    if shared.broker_url:
        from lmref.production.batch import BatchConfig, register_batch_api

        register_batch_api(
            app, BatchConfig(broker_url=shared.broker_url, store_url=shared.store_url)
        )
    return app


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
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JSONErrorChannel(HTTPChannel):
    error_task_class = _JSONErrorTask


class ServerHandle:
    """A waitress server running in a thread of this process (tests, notebooks, benchmarks)."""

    def __init__(self, app: Flask, server, thread: threading.Thread, stop: threading.Event):
        self.app, self.server, self.thread, self._stop = app, server, thread, stop
        self.state: ServingState = app.extensions["lmref"]
        self.url = f"http://127.0.0.1:{server.effective_port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.state.ready:
            errors = [e.load_error for e in self.state.engines.values() if e.load_error]
            if errors:
                raise RuntimeError(f"model failed to load: {errors}")
            if time.monotonic() > deadline:
                raise TimeoutError("models did not load in time")
            time.sleep(0.05)

    def stop(self, drain_timeout: float | None = None) -> bool:
        """Drain (new requests get 503), wait for in-flight ones, then close. True when drained."""
        state = self.state
        state.draining.set()
        drained = state.wait_idle(
            state.config.drain_timeout_s if drain_timeout is None else drain_timeout
        )
        state.close()
        if not drained:
            state.wait_idle(2.0)  # aborted streams still send their error event
        self._stop.set()
        self.thread.join(timeout=10)
        return drained


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


def _waitress_server(app: Flask, config: ServingConfig, port: int):
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


def start_server(
    config: ServingConfig, port: int = 0, wait: bool = True, shared: SharedServices | None = None
) -> ServerHandle:
    """Serve ``config`` with waitress in a background thread on ``config.host`` (port 0: free).
    ``config.torch_threads`` is applied to this whole process."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    app = build_app(config, shared)
    server = _waitress_server(app, config, port)
    stop = threading.Event()
    thread = threading.Thread(
        target=_run_waitress, args=(server, stop), name="waitress", daemon=True
    )
    thread.start()
    handle = ServerHandle(app, server, thread, stop)
    if wait:
        handle.wait_ready()
    return handle


# ----------------------------------------------------------------------------------- the command
ALIASES = {"server_threads": ["--threads"], "drain_timeout_s": ["--drain-timeout"]}
CLI_FIELDS = (
    (
        ServingConfig,
        [
            f
            for f in dataclasses.fields(ServingConfig)
            if f.name not in {"models", "aliases", "api_keys", "load_in_background"}
        ],
    ),
    (ModelSpec, [f for f in dataclasses.fields(ModelSpec) if f.name not in {"name", "path"}]),
)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0: a free one), not {port}")
    return port


def _kind(annotation: str):
    """The parser of a dataclass field's type, as written (``int``, ``float | None`` ...)."""
    base = {"int": int, "float": float, "str": str}[annotation.split(" |")[0]]
    if "None" not in annotation:
        return base

    def optional(text: str):
        return None if text.lower() in {"none", "null", ""} else base(text)

    optional.__name__ = base.__name__
    return optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmref.serve",
        description="Serve Hugging Face causal LMs with an OpenAI-compatible API.",
        epilog="API keys: --api-key KEY (repeatable) or env LMREF_API_KEYS=k1,k2. With neither, "
        "auth is off and anyone who reaches the port may use the models. On a machine "
        "shared with other busy jobs, export OMP_WAIT_POLICY=PASSIVE.",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME=PATH",
        help="a model version to serve (repeatable; the first is the default): a "
        "folder, a cached hub id or a course name; default "
        f"{DEFAULT_MODEL}",
    )
    parser.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME=V1:W1,V2:W2",
        help="an A/B alias splitting traffic by weight, e.g. prod=v1:0.9,v2:0.1",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="a key clients send as 'Authorization: Bearer KEY' (repeatable); "
        "default: env LMREF_API_KEYS",
    )
    parser.add_argument(
        "--unbatched",
        action="append",
        default=[],
        metavar="NAME",
        help="also serve NAME-unbatched: the same weights with max_batch_size=1",
    )
    for cls, fields in CLI_FIELDS:
        group = parser.add_argument_group(f"{cls.__name__} (lmref.{cls.__module__.split('.')[-1]})")
        for f in fields:
            flags = [f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, [])]
            if f.type == "bool":  # --pack-linears / --no-pack-linears
                group.add_argument(
                    *flags, dest=f.name, default=f.default, action=argparse.BooleanOptionalAction
                )
                continue
            kind = _port if f.name == "port" else _kind(f.type)
            help_ = (
                "a Jinja chat template for every --model: a file, or the template text"
                if f.name == "chat_template"
                else "default: %(default)s"
            )
            group.add_argument(
                *flags,
                dest=f.name,
                type=kind,
                default=f.default,
                help=help_,
                metavar=f.type.split(" |")[0].upper(),
            )
    group = parser.add_argument_group("SharedServices (lmref.production.shared_cache, lmref.production.batch)")
    for f in dataclasses.fields(SharedServices):
        default = os.environ.get(SHARED_ENV.get(f.name, ""), f.default)
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=_kind(f.type),
            default=default,
            help="default: %(default)s",
            metavar=f.type.split(" |")[0].upper(),
        )
    return parser


def _model_path(parser: argparse.ArgumentParser, name: str, path: str) -> str:
    """The folder to load, or a usage error: a mistyped path must not 'load' forever."""
    if "/" not in path and os.sep not in path:  # a course name (imports transformers: seconds)
        from lmref.models.loading import resolve_model

        path = resolve_model(path)
    if os.path.isdir(path):
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return path
    parser.error(f"--model {name}={path}: no such folder, nor a model in the Hugging Face cache")


def config_from_args(argv: list[str] | None) -> ServingConfig:
    """Parse the command line into a ServingConfig; anything wrong is a usage error (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    template = args.chat_template
    if template is not None:
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                template = f.read()
        elif "{{" not in template and "{%" not in template:
            parser.error(
                f"--chat-template {template}: no such file (a template given as text "
                "has {{ or {%)"
            )
    spec_kw = {f.name: getattr(args, f.name) for f in CLI_FIELDS[1][1]} | {
        "chat_template": template
    }
    specs = []
    for item in args.model or [DEFAULT_MODEL]:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--model takes NAME=PATH, got {item!r}")
        specs.append(ModelSpec(name, _model_path(parser, name, path), **spec_kw))
    for name in args.unbatched:
        base = next((s for s in specs if s.name == name), None)
        if base is None:
            parser.error(f"--unbatched {name}: no such --model")
        specs.append(
            dataclasses.replace(base, name=f"{name}-unbatched", max_batch_size=1, batch_wait_ms=0)
        )
    aliases = {}
    for item in args.alias:
        name, _, routes = item.partition("=")
        try:
            aliases[name] = {v: float(w) for v, w in (r.split(":") for r in routes.split(","))}
        except ValueError:
            parser.error(f"--alias takes NAME=V1:W1,V2:W2, got {item!r}")
    config = ServingConfig(
        models=specs,
        aliases=aliases,
        api_keys=args.api_keys,
        **{f.name: getattr(args, f.name) for f in CLI_FIELDS[0][1]},
    )
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return config


def resolve_model_args(argv: list[str]) -> list[str]:
    """Each ``--model NAME=PATH`` with a course name as PATH gets the converted folder instead."""
    from lmref.models.loading import resolve_model

    argv = list(argv) if "--model" in argv else ["--model", DEFAULT_MODEL, *argv]
    for i, arg in enumerate(argv[:-1]):
        if arg == "--model" and "=" in argv[i + 1]:
            name, path = argv[i + 1].split("=", 1)
            argv[i + 1] = f"{name}={resolve_model(path)}"
    return argv


def shared_from_args(argv: list[str] | None) -> SharedServices:
    args = build_parser().parse_args(argv)
    return SharedServices(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(SharedServices)}
    )


def serve(config: ServingConfig, shared: SharedServices | None = None) -> int:
    """Run until SIGTERM/SIGINT in this process: one process, waitress threads, the batching
    workers inside. On the signal, new requests get 503 and in-flight ones get
    ``drain_timeout_s`` to finish. Prints one JSON line with the URL once listening. Exits 1
    when a model fails to load (a server short of a configured model is misconfigured)."""
    if not config.resolved_api_keys():
        log.warning(
            "NO API KEYS: auth is off, anyone who can reach %s:%s may use the models. "
            "Set --api-key KEY or LMREF_API_KEYS=k1,k2.",
            config.host,
            config.port,
        )
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    app = build_app(config, shared)
    server = _waitress_server(app, config, config.port)
    state: ServingState = app.extensions["lmref"]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop_loop = threading.Event()
    thread = threading.Thread(
        target=_run_waitress, args=(server, stop_loop), name="waitress", daemon=True
    )
    thread.start()
    url = f"http://{config.host}:{server.effective_port}"
    print(json.dumps({"event": "listening", "url": url, "pid": os.getpid()}), flush=True)
    failed = {}
    while not stop.wait(0.5) and not failed:
        failed = {n: e.load_error for n, e in state.engines.items() if e.load_error}
    if failed:
        log.error("model failed to load, stopping: %s", failed)
    state.draining.set()
    drained = state.wait_idle(config.drain_timeout_s)
    state.close()
    if not drained:
        state.wait_idle(2.0)
    stop_loop.set()
    thread.join(timeout=10)
    print(json.dumps({"event": "stopped", "drained": drained}), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return serve(config_from_args(argv), shared_from_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
