"""The model server's configuration: one dataclass, ``ServingConfig``, that the app, the waitress
server and the command line (``python -m lmref.serve``: ``transformers.HfArgumentParser`` over its
fields, aliases from field metadata) all read.

Usage::

    from lmref.serving.config import ServingConfig
    from lmref.serving.engine import ModelSpec

    config = ServingConfig(models=[ModelSpec("base", "artifacts/base")], api_keys=["sk-local"],
                           aliases={"prod": {"base": 1.0}})
    config.validate()                       # ValueError naming what is wrong
    keys = config.resolved_api_keys()       # the keys, or env LMREF_API_KEYS
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmref.serving.engine import ModelSpec


def _flag(default, help: str, aliases: tuple[str, ...] = ()):  # noqa: A002
    """A field whose command-line help (and aliases) live in its metadata, where
    ``HfArgumentParser`` reads them."""
    metadata = {"help": help, **({"aliases": list(aliases)} if aliases else {})}
    return field(default=default, metadata=metadata)


@dataclass
class ServingConfig:
    """Everything ``create_app`` needs. ``api_keys=None`` reads env ``LMREF_API_KEYS`` (comma list);
    an empty list means no auth (loopback demos only)."""

    models: list[ModelSpec]
    aliases: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # {"prod": {"v1": .9, "v2": .1}}
    default_model: str | None = _flag(None, "model used when a request names none (first --model)")
    api_keys: list[str] | None = None
    max_content_length: int = _flag(1 << 20, "bytes of request body (413 above)")
    max_stop_strings: int = _flag(4, "stop strings a request may give")
    default_max_tokens: int = _flag(16, "completions' max_tokens when a request gives none")
    max_tokens_limit: int | None = _flag(None, "an operator cap below the context length")
    cache_size: int = _flag(1024, "greedy responses kept (LRU); 0 turns the cache off")
    shared_response_cache: bool = _flag(
        False,
        "answer a key from another key's cached greedy response (off: each tenant its own "
        "entries). Sharing gains hits on prompts others asked; it leaks them: a hit answers in "
        "ms instead of a generation, so a key can test whether another asked a prompt. Only "
        "for a deployment whose keys all belong to one party",
    )
    load_in_background: bool = True  # /ready says 503 until loaded
    torch_threads: int | None = _flag(None, "torch.set_num_threads; small models: 1 is fastest")
    drain_timeout_s: float = _flag(
        30.0, "SIGTERM: how long in-flight requests may finish", ("--drain-timeout",)
    )
    host: str = _flag("127.0.0.1", "address to listen on (loopback unless told otherwise)")
    port: int = _flag(8000, "port to listen on (0: a free one)")
    grpc_port: int | None = _flag(
        None,
        "also serve the KServe v2 / Triton gRPC protocol on this port (0: a free one; "
        "lmref.serving.grpc_server); off by default",
    )
    server_threads: int = _flag(64, "waitress threads: one per concurrent request", ("--threads",))
    access_log: str = _flag(
        "-", "where the JSON access log goes (python -m lmref.serve): - stdout, a file path, off"
    )
    log_prompts: bool = _flag(False, "put each request's prompt in its access-log line (privacy)")

    def validate(self) -> None:
        """ValueError naming what is wrong: no models, a name used twice, a bad alias, a port."""
        if not self.models:
            raise ValueError("no models to serve: give at least one")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"a port is 0..65535 (0: a free one), not {self.port}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"a gRPC port is 0..65535 (0: a free one), not {self.grpc_port}")
        names = [m.name for m in self.models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"model name {', '.join(twice)} is given more than once")
        for alias, split in self.aliases.items():
            if alias in names:
                raise ValueError(f"alias {alias!r} has the name of a served model")
            unknown = [v for v in split if v not in names]
            if not split or unknown:
                raise ValueError(
                    f"alias {alias!r} routes to {', '.join(unknown) or 'nothing'}, "
                    f"not a served model (served: {', '.join(names)})"
                )
            if any(w <= 0 for w in split.values()):
                raise ValueError(f"alias {alias!r}: every weight must be > 0")

    def resolved_api_keys(self) -> list[str]:
        """``api_keys``, or env ``LMREF_API_KEYS`` (comma list) when ``api_keys`` is None."""
        if self.api_keys is not None:
            return list(self.api_keys)
        return [k.strip() for k in os.environ.get("LMREF_API_KEYS", "").split(",") if k.strip()]
