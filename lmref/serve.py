"""Running the model server: ``python -m lmref.serve`` (one process), or in a thread (tests).

The app is ``lmref.serving.app`` (over ``lmref.serving.engine``), run under waitress by
``lmref.serving.server``; this entry point adds the command line and the production services a
replica may share. ``start_server(config)`` serves in a thread of this process and returns a
handle with ``.url`` and ``.stop()``; ``python -m lmref.serve`` is the one command line. Its flags
come from the fields of ``ServingConfig``, ``ModelSpec`` and ``SharedServices`` through
``lmref.core.cli`` (``transformers.HfArgumentParser``) (``--max-batch-size``, ``--drain-timeout-s`` ...; aliases such as
``--threads`` from field metadata), plus: ``--model NAME=PATH`` (repeatable; a folder, a hub id
in the local cache, a course name from ``lmref.models.loading``: ``smollm2-135m-instruct``, or a
registry version ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` from ``MLFLOW_TRACKING_URI``,
downloaded and verified by ``lmref.models.registry``, the version shown in ``/v1/models/NAME``;
default: that real chat model as ``smollm2``), ``--alias NAME=V1:W1,V2:W2`` (weighted A/B),
``--unbatched NAME`` and ``--api-key KEY`` (repeatable; or env ``LMREF_API_KEYS``, a comma list),
and the ``SharedServices`` of a replica: ``--cache-url redis://...`` (a response cache shared by
replicas, ``lmref.production.shared_cache``) and ``--broker-url amqp://... --store-url
redis://...`` (the OpenAI Batch API on Celery workers, ``lmref.production.batch_api``), and
``--key-store-url redis://...`` (API keys as records with owners, scopes, rate limits, token
quotas and usage, ``lmref.production.key_api``; made with ``python -m lmref.keys``; it replaces
``--api-key``); env ``LMREF_CACHE_URL``, ``LMREF_BROKER_URL``, ``LMREF_STORE_URL``,
``LMREF_KEY_STORE_URL``, and ``--config-store-url redis://...`` (the live configuration every
replica follows: versions loaded and alias weights changed through any replica's
``/v1/admin`` API, ``lmref.production.live_config``; env ``LMREF_CONFIG_STORE_URL``), each
also from a file, ``..._URL_FILE``, and with
``..._USERNAME`` / ``..._PASSWORD`` or their ``_FILE``: a mounted Secret,
``lmref.core.credentials``; logged only through ``redact``. Without keys anyone who reaches
the port may use the models: the server says so loudly at start. A model folder is served
only when it matches its sha256 manifest (``lmref.serving.integrity``); ``--allow-unmanifested``
serves one without (or a hub id) with a warning. SIGTERM: new requests get 503,
in-flight ones get ``--drain-timeout-s`` to finish. Each request gets an ``X-Request-ID`` and one
JSON access-log line (``lmref.serving.audit``) on stdout, or in ``--access-log PATH``; prompts
only with ``--log-prompts``.

Usage::

    python -m lmref.serve --port 8000 --torch-threads 2          # smollm2-135m-instruct
    python -m lmref.serve --api-key sk-local --model v1=artifacts/base \\
        --model v2=artifacts/full-ft --alias prod=v1:0.9,v2:0.1

    from lmref.serve import start_server
    server = start_server(ServingConfig(models=[ModelSpec("base", "artifacts/base")]))
    print(server.url); server.stop()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys

# OpenMP's wait policy is left to libgomp's default: an idle torch thread spins a short while,
# then sleeps. A decode step runs some 300 parallel regions, and forcing OMP_WAIT_POLICY=PASSIVE
# makes each wake a sleeping thread. Measured on the quiet 2-core AMD EPYC (serving_peer, fp32,
# 2 torch threads): passive was 1.9x slower at 1 client (9.4 vs 18.2 tokens/s) and 1.7x at 16
# (93.6 vs 159.2). On a machine shared with other busy jobs (loadavg 3-4) it went the other way
# (16 clients: 13.4 spinning, 38.0 passive): export OMP_WAIT_POLICY=PASSIVE there.
import torch
from flask import Flask

from lmref.core.allocator import keep_freed_memory
from lmref.core.cli import DataclassArgumentParser, flags_dataclass
from lmref.core.credentials import redact, service_url
from lmref.serving.app import ServingConfig, create_app
from lmref.serving.audit import configure_access_log
from lmref.serving.engine import ModelSpec
from lmref.serving.server import ServerHandle, run_until_signal, start_in_thread

__all__ = ["SharedServices", "ServerHandle", "build_app", "build_parser", "start_server"]
log = logging.getLogger("lmref.serve")
DEFAULT_MODEL = "smollm2=smollm2-135m-instruct"


@dataclasses.dataclass
class SharedServices:
    """What replicas share, all off by default; the flags default to env LMREF_CACHE_URL,
    LMREF_BROKER_URL, LMREF_STORE_URL, LMREF_SWEEP_INTERVAL_S, LMREF_KEY_STORE_URL,
    LMREF_CONFIG_STORE_URL (a container's config)."""

    cache_url: str | None = None  # redis://HOST:PORT/DB: response cache shared by replicas
    cache_ttl_s: float = 3600.0
    broker_url: str | None = None  # amqp://...: the Batch API's queue (needs store_url)
    store_url: str | None = None  # redis://...: the Batch API's files, batches and results
    sweep_interval_s: float = 30.0  # how often the Batch API reconciles live batches (0: never)
    # redis://...: API keys as records (owner, scopes, limits, usage; lmref.production.keys),
    # made with `python -m lmref.keys`; replaces --api-key / LMREF_API_KEYS
    key_store_url: str | None = None
    # redis://...: the live configuration shared by replicas (versions loaded, alias weights;
    # lmref.production.live_config): a change through one replica's admin API reaches them all
    config_store_url: str | None = None


SHARED_ENV = {
    "cache_url": "LMREF_CACHE_URL",
    "broker_url": "LMREF_BROKER_URL",
    "store_url": "LMREF_STORE_URL",
    "sweep_interval_s": "LMREF_SWEEP_INTERVAL_S",
    "key_store_url": "LMREF_KEY_STORE_URL",
    "config_store_url": "LMREF_CONFIG_STORE_URL",
}
BOTH_KEY_SOURCES = (
    "--key-store-url (LMREF_KEY_STORE_URL) replaces --api-key and LMREF_API_KEYS: give one or "
    "the other (keys for the store: python -m lmref.keys create)"
)


def build_app(config: ServingConfig, shared: SharedServices | None = None) -> Flask:
    """``create_app`` plus the shared services asked for (imported only then: Celery and redis
    are optional dependencies)."""
    shared = shared or SharedServices()
    if bool(shared.broker_url) != bool(shared.store_url):
        raise ValueError("the Batch API needs both --broker-url and --store-url")
    if shared.key_store_url and config.resolved_api_keys():
        raise ValueError(BOTH_KEY_SOURCES)
    cache = None
    if shared.cache_url:
        from lmref.production.shared_cache import RedisResponseCache

        cache = RedisResponseCache(
            shared.cache_url, shared.cache_ttl_s, {m.name: m.path for m in config.models}
        )
    app = create_app(config, cache=cache)
    if cache is not None:
        cache.register(app.extensions["lmref"].metrics.registry)
    if shared.key_store_url:
        from lmref.production.key_api import register_key_store

        register_key_store(app, shared.key_store_url)
    if shared.config_store_url:
        from lmref.production.live_config import register_config_store

        register_config_store(app, shared.config_store_url)
    if shared.broker_url:
        from lmref.production.batch_api import register_batch_api
        from lmref.production.celery_app import BatchConfig

        register_batch_api(
            app,
            BatchConfig(
                broker_url=shared.broker_url,
                store_url=shared.store_url,
                sweep_interval_s=shared.sweep_interval_s,
            ),
        )
    return app


def start_server(
    config: ServingConfig, port: int = 0, wait: bool = True, shared: SharedServices | None = None
) -> ServerHandle:
    """Serve ``config`` with waitress in a background thread on ``config.host`` (port 0: free).
    ``config.torch_threads`` is applied to this whole process."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    return start_in_thread(build_app(config, shared), config, port, wait)


# ----------------------------------------------------------------------------------- the command
SERVER_FLAGS = flags_dataclass(
    ServingConfig, frozenset({"models", "aliases", "api_keys", "load_in_background"})
)
MODEL_FLAGS = flags_dataclass(
    ModelSpec,
    frozenset({"name", "path"}),
    chat_template="a Jinja chat template for every --model: a file, or the template text",
)
SHARED_FLAGS = flags_dataclass(
    SharedServices,
    group="SharedServices (lmref.production.shared_cache, .batch_api, .key_api, .live_config)",
)


def build_parser() -> DataclassArgumentParser:
    parser = DataclassArgumentParser(
        [SERVER_FLAGS, MODEL_FLAGS, SHARED_FLAGS],
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
        "folder, a cached hub id, a course name or a registry URI models:/NAME@ALIAS "
        f"(MLFLOW_TRACKING_URI); default {DEFAULT_MODEL}",
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
    # A container's config: the environment gives the defaults, a flag still wins.
    parser.set_defaults(**shared_env_defaults())
    return parser


def shared_env_defaults(env: dict[str, str] | None = None) -> dict[str, str]:
    """The ``SharedServices`` the environment sets: each URL from ``LMREF_X_URL`` or a file
    (``LMREF_X_URL_FILE``), with ``LMREF_X_USERNAME`` / ``LMREF_X_PASSWORD`` (or their
    ``_FILE``, a mounted Secret) put in (``lmref.core.credentials.service_url``). A URL with a
    password on the command line shows in ``ps``: a file or the environment keeps it out."""
    env = os.environ if env is None else env
    found = {}
    for field, name in SHARED_ENV.items():
        value = service_url(name[: -len("_URL")], env) if name.endswith("_URL") else env.get(name)
        if value:
            found[field] = value
    return found


def _parse(argv: list[str] | None):
    """(parser, server flags, model flags, shared flags, the hand-made flags); unknown
    arguments are a usage error (exit 2), as argparse's own parse_args makes them."""
    parser = build_parser()
    *parsed, rest = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False
    )
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return parser, *parsed


def _model_path(parser: DataclassArgumentParser, name: str, path: str) -> str:
    """The folder to load, or a usage error: a mistyped path must not 'load' forever."""
    if path.startswith("models:/"):  # the registry: resolved once here, so an alias moved later
        return _registry_path(parser, name, path)  # does not change what this server loads
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


def _registry_path(parser: DataclassArgumentParser, name: str, uri: str) -> str:
    """The downloaded, verified folder of a ``models:/`` URI, or a usage error naming why."""
    from lmref.models.registry import RegistryError, fetch_model, registry_origin

    try:
        folder = fetch_model(uri)
    except ImportError as exc:
        parser.error(f"--model {name}={uri}: the registry needs mlflow (the tracking extra): {exc}")
    except (RegistryError, OSError) as exc:
        parser.error(f"--model {name}={uri}: {exc}")
    except Exception as exc:  # mlflow's own errors (server down, refused): say which and where
        parser.error(f"--model {name}={uri}: the registry failed: {type(exc).__name__}: {exc}")
    origin = registry_origin(folder) or {}
    log.info("model %s: %s is version %s, in %s", name, uri, origin.get("version"), folder)
    return str(folder)


def config_from_args(argv: list[str] | None) -> ServingConfig:
    """Parse the command line into a ServingConfig; anything wrong is a usage error (exit 2)."""
    parser, server, model, _, args = _parse(argv)
    template = model.chat_template
    if template is not None:
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                template = f.read()
        elif "{{" not in template and "{%" not in template:
            parser.error(
                f"--chat-template {template}: no such file (a template given as text "
                "has {{ or {%)"
            )
    spec_kw = {**dataclasses.asdict(model), "chat_template": template}
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
        models=specs, aliases=aliases, api_keys=args.api_keys, **dataclasses.asdict(server)
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
    return SharedServices(**dataclasses.asdict(_parse(argv)[3]))


def serve(config: ServingConfig, shared: SharedServices | None = None) -> int:
    """Run until SIGTERM/SIGINT in this process: one process, waitress threads, the batching
    workers inside. On the signal, new requests get 503 and in-flight ones get
    ``drain_timeout_s`` to finish. Prints one JSON line with the URL once listening. Exits 1
    when a model fails to load (a server short of a configured model is misconfigured), before
    listening when its folder is refused at a glance (no manifest, a file missing, added or of
    another size)."""
    if not config.resolved_api_keys() and not (shared and shared.key_store_url):
        log.warning(
            "NO API KEYS: auth is off, anyone who can reach %s:%s may use the models. "
            "Set --api-key KEY or LMREF_API_KEYS=k1,k2.",
            config.host,
            config.port,
        )
    shared = shared or SharedServices()
    for what in ("cache_url", "broker_url", "store_url", "key_store_url", "config_store_url"):
        if getattr(shared, what):  # where it is, never the password
            log.info("%s %s", what, redact(getattr(shared, what)))
    keep_freed_memory()  # before any thread allocates: lmref.core.allocator says why
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    refused = refused_models(config)
    if refused:  # before listening: a replica that would serve 503s never joins a pool
        log.error("model failed to load, not starting: %s", refused)
        return 1
    configure_access_log(config.access_log)  # this process's: a thread server leaves logging be
    return run_until_signal(build_app(config, shared), config)


def refused_models(config: ServingConfig) -> dict[str, str]:
    """Model name -> why the server would refuse it (``lmref.serving.integrity``), from a quick
    look: names and sizes against each manifest, no file hashed (the engine hashes once, as it
    loads, and a changed byte then ends the process all the same)."""
    from lmref.serving.integrity import IntegrityError, check_model

    refused = {}
    for spec in config.models:
        try:
            check_model(spec.path, spec.allow_unmanifested, hashes=False)
        except IntegrityError as exc:
            refused[spec.name] = str(exc)
    return refused


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config, shared = config_from_args(argv), shared_from_args(argv)
    if shared.key_store_url and config.resolved_api_keys():
        build_parser().error(BOTH_KEY_SOURCES)
    return serve(config, shared)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
