"""Clients of the Batch pipeline's backing services, each with bounded timeouts: Redis (the store,
the shared cache) and RabbitMQ (the producer's publish). A frozen or unreachable server costs a
caller ``timeout_s``, never a hang, whatever redis-py version is installed.

redis-py changed its defaults between the versions this package accepts (5.0 to 8): 5.x does not
retry a failed command; 6.0 and later retry three times with exponential backoff (up to 10 s a
wait), which turns a 2 s socket timeout into tens of seconds. ``redis_client`` sets both
timeouts and the retry policy (none: the callers decide what to retry, and when), so every
version behaves the same.

Usage::

    from lmref.production.connections import STORE_ERRORS, redis_client

    r = redis_client("redis://127.0.0.1:6379/0", timeout_s=2.0)
    try:
        r.ping()
    except STORE_ERRORS:       # down, frozen past timeout_s, loading, or out of memory
        ...
"""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

STORE_TIMEOUT_S = 2.0  # a store call that takes longer than this is an unavailable store

# What "the store is unavailable" means: not answering (ConnectionError, TimeoutError; a Redis
# still loading its append-only file is a ConnectionError) or refusing writes because it is full
# (``noeviction`` at maxmemory answers "OOM ..."; redis-py raises ``OutOfMemoryError`` from 5.0.4
# on, a ``ResponseError`` before). A caller waits and tries again; nothing is lost.
STORE_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    getattr(redis.exceptions, "OutOfMemoryError", redis.ConnectionError),
    getattr(redis.exceptions, "ReadOnlyError", redis.ConnectionError),  # a replica mid-failover
)


def redis_client(url: str, timeout_s: float = STORE_TIMEOUT_S) -> redis.Redis:
    """A Redis client whose every call answers or raises within about ``timeout_s``."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # no hidden retries (redis-py >= 6 retries 3 times)
        retry_on_timeout=False,
    )


def amqp_publish_options(timeout_s: float = 5.0) -> dict:
    """Celery settings that bound a producer's publish to about ``timeout_s``: the connect
    timeout, a read/write timeout on the socket, and publisher confirms (a message counts as
    sent once RabbitMQ has taken it, not once it is in a socket buffer). For the replica's
    producer only: a worker's consumer waits on its socket by design."""
    return {
        "broker_connection_timeout": timeout_s,
        "broker_transport_options": {
            "confirm_publish": True,
            "read_timeout": timeout_s,
            "write_timeout": timeout_s,
        },
        # Celery's own retries of a failed publish: two, 0.2 s apart, then the error is raised.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
    }
