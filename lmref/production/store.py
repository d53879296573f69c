"""The Batch API's store in Redis: uploaded files, batches, and each request's result line,
written once per ``custom_id`` (a redelivered request still appears once in the output), with
the output and error files assembled in input order when the last result arrives.

Usage::

    from lmref.production.store import Store, result_line

    store = Store("redis://127.0.0.1:6379/0")
    meta = store.put_file(b'{"custom_id": "a", ...}\n', "requests.jsonl", "batch")
    store.record(batch_id, "a", result_line("a", 200, body, "req_1"))   # False: stored before
    batch = store.finalize(batch_id)        # completed once every request has its line
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

TTL_S = 7 * 24 * 3600  # files, batches and results expire after this (BatchConfig.ttl_s)


class Store:
    """Files, batches and per-request results in Redis (keys ``lmref:batch:*``)."""

    def __init__(self, url: str, ttl_s: int = TTL_S):
        self.r = redis.Redis.from_url(url)
        self.ttl_s = ttl_s

    def _key(self, *parts: str) -> str:
        return "lmref:batch:" + ":".join(parts)

    def put_file(self, content: bytes, filename: str, purpose: str, file_id: str = "") -> dict:
        file_id = file_id or "file-" + uuid.uuid4().hex
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": int(time.time()) + self.ttl_s,
        }
        pipe = self.r.pipeline()
        pipe.set(self._key("file", file_id), json.dumps(meta), ex=self.ttl_s)
        pipe.set(self._key("file", file_id, "content"), content, ex=self.ttl_s)
        pipe.execute()
        return meta

    def file(self, file_id: str) -> dict | None:
        raw = self.r.get(self._key("file", file_id))
        return json.loads(raw) if raw else None

    def file_content(self, file_id: str) -> bytes | None:
        return self.r.get(self._key("file", file_id, "content"))

    def put_batch(self, batch: dict, custom_ids: list[str]) -> None:
        pipe = self.r.pipeline()
        pipe.set(self._key(batch["id"]), json.dumps(batch), ex=self.ttl_s)
        pipe.rpush(self._key(batch["id"], "order"), *custom_ids)
        pipe.expire(self._key(batch["id"], "order"), self.ttl_s)
        pipe.execute()

    def batch(self, batch_id: str) -> dict | None:
        raw = self.r.get(self._key(batch_id))
        return json.loads(raw) if raw else None

    def update_batch(self, batch_id: str, **fields: Any) -> None:
        batch = self.batch(batch_id) or {}
        self.r.set(self._key(batch_id), json.dumps({**batch, **fields}), ex=self.ttl_s)

    def batch_ids(self) -> list[str]:
        return sorted(
            (
                k.decode().rsplit(":", 1)[1]
                for k in self.r.scan_iter(self._key("batch_*"))
                if k.count(b":") == 2
            ),
            reverse=True,
        )

    # The result and its count in one step (a Lua script runs atomically in Redis): a worker that
    # dies in between cannot leave a result uncounted, and a batch that never completes.
    _RECORD = """
    if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
    redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
    redis.call('EXPIRE', KEYS[1], ARGV[4]); redis.call('EXPIRE', KEYS[2], ARGV[4])
    return 1"""

    def record(self, batch_id: str, custom_id: str, line: dict) -> bool:
        """Store one request's result line; False when it was stored already (a redelivery)."""
        outcome = "completed" if line["error"] is None else "failed"
        keys = [self._key(batch_id, "results"), self._key(batch_id, "counts")]
        return bool(
            self.r.eval(self._RECORD, 2, *keys, custom_id, json.dumps(line), outcome, self.ttl_s)
        )

    def has_result(self, batch_id: str, custom_id: str) -> bool:
        return bool(self.r.hexists(self._key(batch_id, "results"), custom_id))

    def attempt(self, batch_id: str, custom_id: str, worker: str) -> int:
        """Count one delivery of a request to a worker; returns how many there were."""
        pipe = self.r.pipeline()
        pipe.hincrby(self._key(batch_id, "attempts"), custom_id, 1)
        pipe.hset(self._key(batch_id, "workers"), custom_id, worker)
        pipe.expire(self._key(batch_id, "attempts"), self.ttl_s)
        pipe.expire(self._key(batch_id, "workers"), self.ttl_s)
        return int(pipe.execute()[0])

    def attempts(self, batch_id: str) -> dict[str, int]:
        return {
            k.decode(): int(v) for k, v in self.r.hgetall(self._key(batch_id, "attempts")).items()
        }

    def running(self, batch_id: str) -> dict[str, str]:
        """Requests a worker has taken and not finished: custom_id -> worker."""
        done = set(k.decode() for k in self.r.hkeys(self._key(batch_id, "results")))
        return {c: w for c, w in self.workers(batch_id).items() if c not in done}

    def workers(self, batch_id: str) -> dict[str, str]:
        """Which worker took each request last (a redelivered one: the one that finished it)."""
        return {
            k.decode(): v.decode()
            for k, v in self.r.hgetall(self._key(batch_id, "workers")).items()
        }

    def finalize(self, batch_id: str) -> dict | None:
        """When every request has a result: write the output and error files (input order) and
        mark the batch completed. Idempotent; any replica or worker may call it."""
        batch = self.batch(batch_id)
        if batch is None or batch["status"] in ("completed", "failed", "cancelled"):
            return batch
        done = {
            k.decode(): int(v) for k, v in self.r.hgetall(self._key(batch_id, "counts")).items()
        }
        total = batch["request_counts"]["total"]
        counts = {
            "total": total,
            "completed": done.get("completed", 0),
            "failed": done.get("failed", 0),
        }
        batch["request_counts"] = counts
        if counts["completed"] + counts["failed"] < total:
            return batch
        # One finalizer at a time; the lock expires, so a finalizer that died is replaced.
        if not self.r.set(self._key(batch_id, "finalizing"), "1", nx=True, ex=30):
            return batch
        results = self.r.hgetall(self._key(batch_id, "results"))
        order = [c.decode() for c in self.r.lrange(self._key(batch_id, "order"), 0, -1)]
        lines = [json.loads(results[c.encode()]) for c in order]
        ok = [line for line in lines if line["error"] is None]
        bad = [line for line in lines if line["error"] is not None]

        def jsonl(items: list[dict]) -> bytes:
            return "".join(json.dumps(x) + "\n" for x in items).encode()

        output = (
            self.put_file(
                jsonl(ok), f"{batch_id}_output.jsonl", "batch_output", f"file-{batch_id}-output"
            )
            if ok
            else None
        )
        errors = (
            self.put_file(
                jsonl(bad), f"{batch_id}_error.jsonl", "batch_output", f"file-{batch_id}-errors"
            )
            if bad
            else None
        )
        now = int(time.time())
        self.update_batch(
            batch_id,
            status="completed",
            request_counts=counts,
            output_file_id=output and output["id"],
            error_file_id=errors and errors["id"],
            finalizing_at=now,
            completed_at=now,
        )
        return self.batch(batch_id)


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


def failure_line(custom_id: str, code: str, message: str) -> dict:
    """A line of the error file for a request that got no response (its worker lost, its
    time limit hard-killed it, its attempts used up)."""
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
