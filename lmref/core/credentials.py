"""Credentials from the environment or from files, and URLs that are safe to log.

A secret reaches a process one of two ways: an environment variable (``LMREF_BROKER_URL``) or a
file named by the same variable with ``_FILE`` (``LMREF_BROKER_URL_FILE=/run/secrets/broker``),
which is how Kubernetes and Docker mount Secrets. A file keeps the secret out of the process's
environment, which children inherit and ``/proc/PID/environ`` shows. A service URL may also be
given without its credentials (``amqp://rabbitmq:5672//``, a ConfigMap's) and its user and
password separately (``LMREF_BROKER_USERNAME_FILE``, ``LMREF_BROKER_PASSWORD_FILE``, a Secret's):
``service_url`` puts them together. Anything that logs or prints a URL prints ``redact(url)``.
Standard library only: every stage and the lab may use it.

Usage::

    from lmref.core.credentials import redact, service_url

    url = service_url("LMREF_BROKER")   # LMREF_BROKER_URL[_FILE] + LMREF_BROKER_{USERNAME,PASSWORD}[_FILE]
    log.info("broker %s", redact(url))  # amqp://lmref:***@rabbitmq:5672//
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping

MASK = "***"
# Query parameters that carry a secret in some clients' URLs (redis-py takes ?password=).
SECRET_QUERY_KEYS = ("password", "pass", "secret", "token", "key")


def read_secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of env ``name``, or the contents of the file env ``name_FILE`` names (one
    trailing newline dropped: ``echo`` and ``kubectl create secret --from-file`` add one).
    None when neither is set; both set is a configuration error (which one was meant?)."""
    env = os.environ if env is None else env
    value, path = env.get(name), env.get(name + "_FILE")
    if value and path:
        raise ValueError(f"both {name} and {name}_FILE are set: give one")
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return text[:-1] if text.endswith("\n") else text
    return value or None


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """``url`` with this user and password (percent-encoded), replacing any it had; a None
    keeps the URL's own. Redis' ``requirepass`` has no user: ``redis://:PASSWORD@host``."""
    parts = urllib.parse.urlsplit(url)
    user = parts.username if username is None else username
    secret = parts.password if password is None else password
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address goes back in brackets
        host = f"[{host}]"
    if parts.port is not None:
        host += f":{parts.port}"
    auth = urllib.parse.quote(user or "", safe="")
    if secret:
        auth += ":" + urllib.parse.quote(secret, safe="")
    netloc = f"{auth}@{host}" if auth else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def service_url(prefix: str, env: Mapping[str, str] | None = None) -> str | None:
    """A backing service's URL from ``PREFIX_URL`` (or ``_FILE``), with ``PREFIX_USERNAME`` and
    ``PREFIX_PASSWORD`` (or their ``_FILE``) put in when given. None when no URL is set."""
    url = read_secret(prefix + "_URL", env)
    if url is None:
        return None
    username = read_secret(prefix + "_USERNAME", env)
    password = read_secret(prefix + "_PASSWORD", env)
    if username is None and password is None:
        return url
    return with_credentials(url, username, password)


def redact(url: str | None) -> str | None:
    """``url`` with its password (and any secret query parameter) replaced by ``***``: what a
    log line may say. The user, host, port and path stay, so the line still says where."""
    if not url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can parse: say nothing of it
        return MASK
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode(
            [(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*"
        )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
