"""The Batch API's store in Redis: uploaded files, batches, and each request's result line,
written once per ``custom_id`` (a redelivered request still appears once in the output), with
the output and error files assembled in input order when the last result arrives.

Ids are checked against their format before they reach a key name (``batch_id_ok``,
``file_id_ok``): an id such as ``{id}:order`` must not name another key. Every call is bounded
(``lmref.production.connections``): an unavailable store raises one of ``STORE_ERRORS``, which
the API answers with a 503 and a worker waits out without acknowledging its message.

The store belongs in a Redis of its own with ``maxmemory-policy noeviction`` and an append-only
file on a persistent volume (``deploy/k8s/backends.yaml``): its keys are live state, not a cache.
Keys expire ``ttl_s`` after their last write, as OpenAI's files do; they are never evicted.

Every file and batch has an ``owner`` (the tenant that created it; a batch's output and error
files are its owner's): ``batch(id, owner)`` and ``file(id, owner)`` find nothing of another
owner, and each owner's batches and files are listed from an index of its own. A cancelled
batch (``cancel``) ends ``cancelled`` with the output of what finished. Files: ``lmref.production.files``.

Usage::

    from lmref.production.store import Store, result_line

    store = Store("redis://127.0.0.1:6379/0")
    meta = store.put_file(b'{"custom_id": "a", ...}\n', "requests.jsonl", "batch", owner="key_a")
    store.record(batch_id, "a", result_line("a", 200, body, "req_1"))   # False: stored before
    batch = store.finalize(batch_id)        # completed once every request has its line
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import redis

from lmref.production.connections import redis_client
from lmref.production.files import FileStore, file_id_ok, owner_of, owner_tag

__all__ = ["Store", "batch_id_ok", "file_id_ok", "failure_line", "result_line", "TERMINAL"]

TTL_S = 7 * 24 * 3600  # files, batches and results expire after this (BatchConfig.ttl_s)
TERMINAL = ("completed", "failed", "cancelled", "expired")
LIVE_STATUSES = ("validating", "in_progress", "cancelling")  # what update_batch may change
_BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


def batch_id_ok(batch_id: str) -> bool:
    """Whether ``batch_id`` has the form this store gives out (``batch_`` and 32 hex digits)."""
    return isinstance(batch_id, str) and _BATCH_ID.fullmatch(batch_id) is not None


class Store(FileStore):
    """Files, batches and per-request results in Redis (keys ``lmref:batch:*``), each file and
    batch owned by one tenant (``owner``: ``lmref.serving.auth.Principal.owner``)."""

    def __init__(self, url: str, ttl_s: int = TTL_S, timeout_s: float = 2.0):
        self.r = redis_client(url, timeout_s)
        self.ttl_s = ttl_s

    def _key(self, *parts: str) -> str:
        return "lmref:batch:" + ":".join(parts)

    # ---------------------------------------------------------------------------------- batches
    def put_batch(self, batch: dict, custom_ids: list[str], content: bytes | None = None) -> None:
        """Store a new batch, its request order and its own copy of the input file's
        ``content``, and list it (newest first, and among the live ones the sweeper watches).
        The copy is what lets the owner delete the input file while the batch runs, as OpenAI
        allows: the sweeper requeues lost requests from it (twice the bytes while it lives)."""
        batch_id, owned = batch["id"], self._key("index", owner_tag(owner_of(batch)))
        pipe = self.r.pipeline()  # MULTI/EXEC: all of it or nothing
        if content is not None:
            pipe.set(self._key(batch_id, "input"), content, ex=self.ttl_s)
        pipe.set(self._key(batch_id), json.dumps(batch), ex=self.ttl_s)
        pipe.rpush(self._key(batch_id, "order"), *custom_ids)
        pipe.expire(self._key(batch_id, "order"), self.ttl_s)
        pipe.zadd(self._key("index"), {batch_id: time.time()})  # finer than created_at
        pipe.zadd(owned, {batch_id: time.time()})  # the owner's list reads only its own
        pipe.expire(owned, self.ttl_s)
        pipe.sadd(self._key("live"), batch_id)
        pipe.execute()

    def batch(self, batch_id: str, owner: str | None = None) -> dict | None:
        """The stored batch (with its owner); None when unknown, or when ``owner`` is given and
        is not the batch's."""
        if not batch_id_ok(batch_id):
            return None
        raw = self.r.get(self._key(batch_id))
        batch = json.loads(raw) if raw else None
        if batch is None or (owner is not None and owner_of(batch) != owner):
            return None
        return batch

    def update_batch(
        self, batch_id: str, allowed: tuple[str, ...] | None = None, **fields: Any
    ) -> dict | None:
        """Change the batch's fields while its status is one of ``allowed`` (default: any that
        is not final), atomically. A read-then-write would let two writers race: a cancel that
        read ``in_progress`` could overwrite the ``completed`` the last result's finalize wrote
        meanwhile, leaving a batch ``cancelling`` for ever. Under WATCH a change in between makes
        this read again. Returns the batch as it is now, changed or not; None when it is gone."""
        key = self._key(batch_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    batch = json.loads(raw) if raw else None
                    status = batch and batch.get("status")
                    if batch is None or status not in (allowed or LIVE_STATUSES):
                        pipe.unwatch()
                        return batch
                    batch.update(fields)
                    pipe.multi()
                    pipe.set(key, json.dumps(batch), ex=self.ttl_s)
                    if batch.get("status") in TERMINAL:
                        pipe.srem(self._key("live"), batch_id)
                    pipe.execute()
                    return batch
                except redis.WatchError:  # written meanwhile: read it again
                    continue

    def fail_batch(
        self, batch_id: str, code: str, message: str, now: float | None = None
    ) -> dict | None:
        """Mark a batch ``failed`` with one error, in OpenAI's ``errors`` shape."""
        error = {"code": code, "message": message, "param": None, "line": None}
        return self.update_batch(
            batch_id,
            status="failed",
            failed_at=int(time.time() if now is None else now),
            errors={"object": "list", "data": [error]},
        )

    def batch_ids(
        self, after: str | None = None, limit: int = 20, owner: str | None = None
    ) -> list[str]:
        """Batch ids, newest first (``owner``: that owner's only); ``after``: those older than
        that one (OpenAI's cursor)."""
        index = self._key("index") if owner is None else self._key("index", owner_tag(owner))
        start = 0
        if after is not None:
            rank = self.r.zrevrank(index, after) if batch_id_ok(after) else None
            if rank is None:
                return []
            start = rank + 1
        return [i.decode() for i in self.r.zrevrange(index, start, start + limit - 1)]

    def live_batch_ids(self) -> list[str]:
        """Batches not yet completed, failed or cancelled: the ones the sweeper watches."""
        return sorted(i.decode() for i in self.r.smembers(self._key("live")))

    def backlog(self, owner: str) -> int:
        """Requests of the owner's live batches that have no result yet: what it has waiting
        (``lmref.production.fair_queue`` turns it into message priorities)."""
        live = self.live_batch_ids()
        mine = set(self.r.zrange(self._key("index", owner_tag(owner)), 0, -1)) if live else set()
        waiting = 0
        for batch_id in (b for b in live if b.encode() in mine):
            batch = self.batch(batch_id)
            if batch is not None and batch["status"] in ("validating", "in_progress"):
                counts = self.counts(batch_id, batch["request_counts"]["total"])
                waiting += max(0, counts["total"] - counts["completed"] - counts["failed"])
        return waiting

    def forget(self, batch_id: str) -> None:
        """Drop an expired batch from the index and the live set."""
        self.r.zrem(self._key("index"), batch_id)
        self.r.srem(self._key("live"), batch_id)

    def batch_input(self, batch_id: str, file_id: str) -> bytes | None:
        """The batch's requests: its own copy, else (a batch stored before copies were kept)
        the input file ``file_id``, if it is still there."""
        if not batch_id_ok(batch_id):
            return None
        return self.r.get(self._key(batch_id, "input")) or self.file_content(file_id)

    def release(self, batch_id: str, custom_id: str) -> None:
        """A worker took the request and then found its batch cancelled: it no longer runs, so
        the cancel need not wait for it."""
        self.r.hdel(self._key(batch_id, "workers"), custom_id)

    def order(self, batch_id: str) -> list[str]:
        return [c.decode() for c in self.r.lrange(self._key(batch_id, "order"), 0, -1)]

    # ---------------------------------------------------------------------------------- results
    # The result, its count and the batch's last activity in one step (a Lua script runs
    # atomically in Redis): a worker that dies in between cannot leave a result uncounted.
    _RECORD = """
    if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
    redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
    redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[4])
    redis.call('EXPIRE', KEYS[1], ARGV[4]); redis.call('EXPIRE', KEYS[2], ARGV[4])
    return 1"""

    def record(self, batch_id: str, custom_id: str, line: dict) -> bool:
        """Store one request's result line; False when it was stored already (a redelivery)."""
        outcome = "completed" if line["error"] is None else "failed"
        keys = [self._key(batch_id, k) for k in ("results", "counts", "active")]
        args = [custom_id, json.dumps(line), outcome, self.ttl_s, time.time()]
        return bool(self.r.eval(self._RECORD, 3, *keys, *args))

    def has_result(self, batch_id: str, custom_id: str) -> bool:
        return bool(self.r.hexists(self._key(batch_id, "results"), custom_id))

    def done_ids(self, batch_id: str) -> set[str]:
        return {k.decode() for k in self.r.hkeys(self._key(batch_id, "results"))}

    def attempt(self, batch_id: str, custom_id: str, worker: str) -> int:
        """Count one delivery of a request to a worker; returns how many there were."""
        pipe = self.r.pipeline()
        pipe.hincrby(self._key(batch_id, "attempts"), custom_id, 1)
        pipe.hset(self._key(batch_id, "workers"), custom_id, worker)
        pipe.set(self._key(batch_id, "active"), time.time(), ex=self.ttl_s)
        pipe.expire(self._key(batch_id, "attempts"), self.ttl_s)
        pipe.expire(self._key(batch_id, "workers"), self.ttl_s)
        return int(pipe.execute()[0])

    def last_activity(self, batch_id: str) -> float | None:
        """When a worker last took or finished one of the batch's requests (epoch seconds)."""
        raw = self.r.get(self._key(batch_id, "active"))
        return float(raw) if raw else None

    def touch(self, batch_id: str) -> None:
        """Mark the batch active now (the sweeper waits ``stall_s`` from here)."""
        self.r.set(self._key(batch_id, "active"), time.time(), ex=self.ttl_s)

    def requeued(self, batch_id: str) -> int:
        """Count one more requeue of the batch's lost requests; returns how many there were."""
        pipe = self.r.pipeline()
        pipe.incr(self._key(batch_id, "requeues"))
        pipe.expire(self._key(batch_id, "requeues"), self.ttl_s)
        return int(pipe.execute()[0])

    def requeues(self, batch_id: str) -> int:
        return int(self.r.get(self._key(batch_id, "requeues")) or 0)

    def lock(self, name: str, ttl_s: int) -> bool:
        """Take the lock ``name`` for ``ttl_s`` seconds (it expires: a holder that died is
        replaced); False when someone holds it."""
        return bool(self.r.set(self._key("lock", name), "1", nx=True, ex=ttl_s))

    def unlock(self, name: str) -> None:
        self.r.delete(self._key("lock", name))

    def attempts(self, batch_id: str) -> dict[str, int]:
        return {
            k.decode(): int(v) for k, v in self.r.hgetall(self._key(batch_id, "attempts")).items()
        }

    def running(self, batch_id: str) -> dict[str, str]:
        """Requests a worker has taken and not finished: custom_id -> worker."""
        done = self.done_ids(batch_id)
        return {c: w for c, w in self.workers(batch_id).items() if c not in done}

    def workers(self, batch_id: str) -> dict[str, str]:
        """Which worker took each request last (a redelivered one: the one that finished it)."""
        return {
            k.decode(): v.decode()
            for k, v in self.r.hgetall(self._key(batch_id, "workers")).items()
        }

    def counts(self, batch_id: str, total: int) -> dict[str, int]:
        done = {
            k.decode(): int(v) for k, v in self.r.hgetall(self._key(batch_id, "counts")).items()
        }
        return {
            "total": total,
            "completed": done.get("completed", 0),
            "failed": done.get("failed", 0),
        }

    def cancel(self, batch_id: str, owner: str) -> dict | None:
        """Start cancelling the owner's batch: ``cancelling`` (workers skip its queued requests),
        then ``cancelled`` once none of it is running (``finalize``). A batch already ending or
        ended is returned as it is; None: no batch of that owner under that id."""
        if self.batch(batch_id, owner) is None:
            return None
        # Only from those two: one cancelling or ended already keeps its state (update_batch).
        self.update_batch(
            batch_id,
            ("validating", "in_progress"),
            status="cancelling",
            cancelling_at=int(time.time()),
        )
        return self.finalize(batch_id)

    def finalize(self, batch_id: str, force: bool = False) -> dict | None:
        """The batch with its counts as they are now; when every request has a result (or it
        is ``cancelling`` and no request of it runs any more, or ``force``: the sweeper gave up
        on a lost one), write the output and error files of what finished (input order) and
        mark it completed (cancelled). Idempotent; any replica or worker may call it."""
        batch = self.batch(batch_id)
        if batch is None or batch["status"] in TERMINAL:
            return batch
        counts = self.counts(batch_id, batch["request_counts"]["total"])
        batch["request_counts"] = counts
        cancelling = batch["status"] == "cancelling"
        if cancelling:
            if self.running(batch_id) and not force:
                return batch
        elif counts["completed"] + counts["failed"] < counts["total"]:
            return batch
        # One finalizer at a time; the lock expires, so a finalizer that died is replaced.
        if not self.r.set(self._key(batch_id, "finalizing"), "1", nx=True, ex=30):
            return batch
        results = self.r.hgetall(self._key(batch_id, "results"))
        order = [c.encode() for c in self.order(batch_id)]
        lines = [json.loads(results[c]) for c in order if c in results]
        # The counts of the lines written, not of a read before: a result recorded in between
        # would be in the files but not in the counts. Those not run: total - completed - failed.
        failed = sum(1 for x in lines if x["error"] is not None)
        counts = {**counts, "completed": len(lines) - failed, "failed": failed}
        output, errors = self._write_outputs(batch_id, owner_of(batch), lines)
        now = int(time.time())
        ended = {"cancelled_at": now} if cancelling else {"completed_at": now}
        return self.update_batch(
            batch_id,
            status="cancelled" if cancelling else "completed",
            request_counts=counts,
            output_file_id=output and output["id"],
            error_file_id=errors and errors["id"],
            finalizing_at=now,
            **ended,
        )

    def _write_outputs(
        self, batch_id: str, owner: str, lines: list[dict]
    ) -> tuple[dict | None, dict | None]:
        """The output (2xx lines) and error files, owned by the batch's owner; None for none."""

        def put(items: list[dict], suffix: str, name: str) -> dict | None:
            if not items:
                return None
            content = "".join(json.dumps(x) + "\n" for x in items).encode()
            file_id = f"file-{batch_id}-{suffix}"
            return self.put_file(
                content, f"{batch_id}_{name}.jsonl", "batch_output", file_id, owner
            )

        return (
            put([x for x in lines if x["error"] is None], "output", "output"),
            put([x for x in lines if x["error"] is not None], "errors", "error"),
        )


def result_line(custom_id: str, status: int, body: Any, request_id: str) -> dict:
    """One line of the output (2xx) or error file, in OpenAI's batch output shape."""
    error = None
    if not 200 <= status < 300:
        detail = body.get("error", {}) if isinstance(body, dict) else {}
        error = {
            "code": detail.get("code") or str(status),
            "message": detail.get("message") or f"HTTP {status}",
        }
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": error,
    }


def failure_line(custom_id: str, code: str, message: str, request_id: str | None = None) -> dict:
    """A line of the error file for a request that got no response (its worker lost, its
    time limit hard-killed it, its attempts used up, its message lost); ``request_id``, when a
    worker had one, in ``error``: the worker's log line names the same."""
    error = {"code": code, "message": message, **({"request_id": request_id} if request_id else {})}
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": None,
        "error": error,
    }
