"""Batch work shared fairly between tenants: RabbitMQ message priorities from each tenant's
backlog, so one key's 10,000-line batch does not hold back another key's one line.

Why priorities, not a queue per key: Celery workers consume a fixed set of queues named at
start (``-Q``); a queue per key means queues created at run time, workers told to consume each
(``add_consumer`` broadcasts), queues that outlive their tenant, and round-robin only between
queues a worker happens to hold. A priority queue keeps one queue, one consumer set, and the
sweeper's "queue empty" test. The queue is declared with ``x-max-priority`` (``MAX_PRIORITY``);
each message's priority falls with the number of requests its tenant already has waiting
(``priority_of``: a log scale, ``MAX_PRIORITY`` for the first request, one step lower each time
the backlog doubles), counting the batch's own earlier lines. A key with little waiting goes
ahead of one with thousands; within one priority, order stays first-in first-out. With
``worker_prefetch_multiplier=1`` and late acks a worker holds one message, so a new
high-priority message is the next one taken.

RabbitMQ refuses to declare an existing queue with other arguments (``PRECONDITION_FAILED``):
a queue made by an older lmref, without ``x-max-priority``, stays as it was. ``check_queue``
(run when a replica starts) says so in a clear error: drain and delete the old queue
(``rabbitmqctl delete_queue lmref-batch``) or name a new one (``LMREF_BATCH_QUEUE``).

Usage::

    from lmref.production.fair_queue import batch_queue, priorities

    app.conf.task_queues = [batch_queue("lmref-batch")]      # make_celery does this
    priorities(backlog=3, count=4)                           # [7, 6, 6, 6]
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

MAX_PRIORITY = 9  # RabbitMQ advises at most 10 levels (0-9): each level costs it memory and CPU


def priority_of(backlog: int) -> int:
    """A message's priority when its tenant has ``backlog`` requests waiting before it."""
    return max(0, MAX_PRIORITY - max(0, backlog).bit_length())


def priorities(backlog: int, count: int) -> list[int]:
    """The priorities of a batch's ``count`` messages, its tenant having ``backlog`` waiting."""
    return [priority_of(backlog + i) for i in range(count)]


def batch_queue(name: str) -> Queue:
    """The batch queue as both sides declare it: Celery's usual direct exchange and routing
    key of the same name, with priorities."""
    return Queue(
        name,
        Exchange(name, type="direct"),
        routing_key=name,
        queue_arguments={"x-max-priority": MAX_PRIORITY},
    )


class QueueMismatch(RuntimeError):
    """The broker holds the queue with other arguments (declared by an older lmref)."""


def check_queue(celery: Celery, name: str) -> None:
    """Declare the queue with priorities now; ``QueueMismatch`` naming the fix when the broker
    has it without them. A broker that cannot be reached is not checked (the Batch API answers
    503 until it is)."""
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            batch_queue(name)(conn.default_channel).declare()
    except Exception as exc:
        if "PRECONDITION_FAILED" in str(exc) or "inequivalent arg" in str(exc):
            raise QueueMismatch(
                f"RabbitMQ queue {name!r} exists without x-max-priority={MAX_PRIORITY} (made by "
                f"an older lmref): let its workers drain it, then delete it (rabbitmqctl "
                f"delete_queue {name}), or set LMREF_BATCH_QUEUE to a new name. ({exc})"
            ) from None
