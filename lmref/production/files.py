"""The Batch API's files in Redis, each owned by one tenant: uploads, and a batch's output and
error files (owned by the batch's owner). ``FileStore`` is the files half of
``lmref.production.store.Store``; a tenant's files are listed from an index of its own, so one
tenant's list never reads another's.

The owner is kept in the stored metadata and never returned (``public``): the routes answer
another tenant's id with the same 404 as an unknown one (no existence leak).

Usage::

    from lmref.production.store import Store

    store = Store("redis://127.0.0.1:6379/0")
    meta = store.put_file(b"...", "requests.jsonl", "batch", owner="key_abc")
    store.file(meta["id"], owner="key_abc")      # the metadata; None for any other owner
    store.file_ids("key_abc", limit=20)          # that owner's files, newest first
    page, more = store.list_files("key_abc", limit=20, purpose="batch_output")
    store.delete_file(meta["id"], owner="key_abc")
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid

ANONYMOUS_OWNER = "anonymous"  # objects stored before owners were recorded belong to no key
_FILE_ID = re.compile(r"file-(?:[0-9a-f]{32}|batch_[0-9a-f]{32}-(?:output|errors))")


def file_id_ok(file_id: str) -> bool:
    """Whether ``file_id`` has a form this store gives out (an upload, or a batch's output)."""
    return isinstance(file_id, str) and _FILE_ID.fullmatch(file_id) is not None


def owner_tag(owner: str) -> str:
    """The owner as it may appear in a Redis key name: a digest, so no owner string (any
    characters, any length) can name another key."""
    return hashlib.sha256(owner.encode("utf-8", "replace")).hexdigest()[:32]


def owner_of(obj: dict) -> str:
    return obj.get("owner") or ANONYMOUS_OWNER


def public(obj: dict | None) -> dict | None:
    """A stored file or batch as the OpenAI API returns it: without its owner."""
    return None if obj is None else {k: v for k, v in obj.items() if k != "owner"}


class FileStore:
    """Files and their per-owner index; the class ``Store`` gives it ``r``, ``ttl_s``, ``_key``."""

    def put_file(
        self,
        content: bytes,
        filename: str,
        purpose: str,
        file_id: str = "",
        owner: str = ANONYMOUS_OWNER,
    ) -> dict:
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
            "owner": owner,
        }
        index = self._key("files", owner_tag(owner))
        pipe = self.r.pipeline()
        pipe.set(self._key("file", file_id), json.dumps(meta), ex=self.ttl_s)
        pipe.set(self._key("file", file_id, "content"), content, ex=self.ttl_s)
        pipe.zadd(index, {file_id: time.time()})
        pipe.expire(index, self.ttl_s)
        pipe.execute()
        return meta

    def file(self, file_id: str, owner: str | None = None) -> dict | None:
        """The file's stored metadata (with its owner); None when unknown, or when ``owner`` is
        given and is not the file's."""
        if not file_id_ok(file_id):
            return None
        raw = self.r.get(self._key("file", file_id))
        meta = json.loads(raw) if raw else None
        if meta is None or (owner is not None and owner_of(meta) != owner):
            return None
        return meta

    def file_content(self, file_id: str) -> bytes | None:
        return self.r.get(self._key("file", file_id, "content")) if file_id_ok(file_id) else None

    def file_ids(
        self,
        owner: str,
        after: str | None = None,
        limit: int = 10_000,
        ascending: bool = False,
    ) -> list[str]:
        """The owner's file ids, newest first (``ascending``: oldest first); ``after``: those
        past that one in that order (OpenAI's cursor). Ids whose file expired are dropped from
        the index here."""
        index = self._key("files", owner_tag(owner))
        rank_of, ranged = (
            (self.r.zrank, self.r.zrange) if ascending else (self.r.zrevrank, self.r.zrevrange)
        )
        start = 0
        if after is not None:
            rank = rank_of(index, after) if file_id_ok(after) else None
            if rank is None:
                return []
            start = rank + 1
        ids = [i.decode() for i in ranged(index, start, start + limit - 1)]
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.exists(self._key("file", i))
        gone = [i for i, there in zip(ids, pipe.execute()) if not there]
        if gone:
            self.r.zrem(index, *gone)
        return [i for i in ids if i not in gone]

    def list_files(
        self,
        owner: str,
        after: str | None = None,
        limit: int = 10_000,
        purpose: str | None = None,
        ascending: bool = False,
    ) -> tuple[list[dict], bool]:
        """One page of the owner's files (``purpose``: of that purpose only) and whether more
        follow. The filter runs before the limit: a page cut first and filtered after could
        come back short or empty while more match, and the client's auto-pager stops at an
        empty page."""
        page: list[dict] = []
        cursor, chunk = after, max(limit + 1, 100)
        while len(page) <= limit:
            ids = self.file_ids(owner, cursor, chunk, ascending)
            metas = [m for m in (self.file(i, owner) for i in ids) if m]
            page += [m for m in metas if purpose in (None, m["purpose"])]
            if not ids:  # the index ended (expired ids were dropped, so a short read is not it)
                break
            cursor = ids[-1]
        return page[:limit], len(page) > limit

    def delete_file(self, file_id: str, owner: str) -> bool:
        """Delete the owner's file; False when there is none of that owner under that id."""
        if self.file(file_id, owner) is None:
            return False
        pipe = self.r.pipeline()
        pipe.delete(self._key("file", file_id), self._key("file", file_id, "content"))
        pipe.zrem(self._key("files", owner_tag(owner)), file_id)
        pipe.execute()
        return True
