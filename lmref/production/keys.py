"""API keys as records in Redis, shared by every replica: an owner (the tenant), scopes, a rate
limit and a token quota per key; only each key's sha256 is stored, the key itself is shown once.

A key is ``sk-lmref-`` plus 32 random bytes (``secrets.token_urlsafe``). Redis holds:

- ``lmref:key:<key_id>``: the record (a hash): owner, scopes, rate_per_s, tokens_per_min,
  created_at, revoked_at, and the hex sha256 of the current secret;
- ``lmref:key-digest:<sha256 hex>``: the key_id of the key with that digest (the lookup);
- ``lmref:keys``: the set of key_ids (listing).

``key_id`` is public (safe in logs and admin listings); the secret is never stored, logged or
listed. ``KeyStore.authenticate`` is a ``lmref.serving.auth.Authenticator``: a server app gets it
with ``lmref.production.key_api.register_key_store``. A replica caches an answer for at most
``cache_s`` (0.5 s), so a revoked or rotated key is refused by every replica within a second.
Redis unreachable: every request is refused with a 503 (fail closed), never let in.

Usage::

    from lmref.production.keys import KeyStore

    store = KeyStore("redis://127.0.0.1:6379/0")
    record, secret = store.create("acme", scopes=["inference"], rate_per_s=5, tokens_per_min=10_000)
    store.authenticate(secret)        # Principal(key_id=record.key_id, owner='acme', ...)
    new_secret = store.rotate(record.key_id)      # the old secret is refused from now on
    store.revoke(record.key_id)
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time

import redis

from lmref.production.connections import STORE_TIMEOUT_S, redis_client
from lmref.serving.auth import SCOPES, Principal, key_digest
from lmref.serving.schema import APIError

PREFIX = "sk-lmref-"  # recognisable in a leaked config or a secret scanner
RECORD = "lmref:key:"
DIGEST = "lmref:key-digest:"
INDEX = "lmref:keys"
CACHE_S = 0.5  # a replica trusts a lookup this long: revocation reaches every replica within 1 s
CACHE_MAX = 10_000  # entries; past it the cache starts over (bounded memory under many keys)

# One round trip, and atomic against a concurrent rotate: the digest's key_id, then its record.
_LOOKUP = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
return {id, redis.call('HGETALL', ARGV[1] .. id)}
"""


def store_unavailable() -> APIError:
    """The 503 of a key store that does not answer: no request is let in without its key."""
    return APIError(
        503,
        "the key store is unavailable; try again shortly",
        "service_unavailable_error",
        code="key_store_unavailable",
        headers={"Retry-After": "1"},
    )


def parse_scopes(scopes: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Scopes from a list or a comma list, each one of ``SCOPES``; ValueError naming the bad one."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    items = [s.strip() for s in items if s.strip()]
    unknown = [s for s in items if s not in SCOPES]
    if unknown or not items:
        what = f"unknown scope {unknown[0]!r}" if unknown else "no scope given"
        raise ValueError(f"{what}: a key's scopes are some of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in items)


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """What the store knows of a key, without its secret (safe to list and log)."""

    key_id: str
    owner: str
    scopes: tuple[str, ...]
    rate_per_s: float | None = None
    tokens_per_min: int | None = None
    created_at: int = 0
    revoked_at: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def principal(self) -> Principal:
        return Principal(
            self.key_id, self.owner, frozenset(self.scopes), self.rate_per_s, self.tokens_per_min
        )

    def public(self) -> dict:
        return {**dataclasses.asdict(self), "scopes": list(self.scopes), "revoked": self.revoked}

    @classmethod
    def from_hash(cls, key_id: str, fields: dict[str, str]) -> KeyRecord:
        def opt(name: str, kind):
            value = fields.get(name, "")
            return kind(value) if value else None

        return cls(
            key_id,
            fields["owner"],
            tuple(s for s in fields.get("scopes", "").split(",") if s),
            opt("rate_per_s", float),
            opt("tokens_per_min", int),
            int(fields.get("created_at") or 0),
            opt("revoked_at", int),
        )


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be a positive number or None (no limit), got {value}")


class KeyStore:
    """Keys in Redis at ``url``: create, list, rotate, revoke, and ``authenticate`` for a server."""

    def __init__(self, url: str, cache_s: float = CACHE_S, timeout_s: float = STORE_TIMEOUT_S):
        self.redis = redis_client(url, timeout_s)
        self.cache_s = cache_s
        self._cache: dict[bytes, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()
        self._lookup = self.redis.register_script(_LOOKUP)

    # ------------------------------------------------------------------------- the server side
    def authenticate(self, token: str) -> Principal | None:
        """The key's Principal, None for an unknown, rotated-away or revoked key. Raises the 503
        ``APIError`` when Redis does not answer: a request is never let in unchecked."""
        presented = key_digest(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(presented)
        if hit is not None and hit[0] > now:
            return hit[1]
        # Redis finds the record by the digest (a hash-table lookup): its timing can depend on
        # the digest of what was presented, never on how many characters of a real secret were
        # right, and sha256 leaves nothing to learn from a near miss. The stored digest is then
        # compared once more in constant time, so a record can only match its own secret.
        try:
            found = self._lookup(keys=[DIGEST + presented.hex()], args=[RECORD])
        except redis.RedisError as exc:
            raise store_unavailable() from exc
        principal = None
        if found:
            key_id, flat = found[0].decode(), [v.decode() for v in found[1]]
            fields = dict(zip(flat[::2], flat[1::2]))
            stored = bytes.fromhex(fields.get("digest", ""))
            if fields and secrets.compare_digest(stored, presented):
                record = KeyRecord.from_hash(key_id, fields)
                principal = None if record.revoked else record.principal()
        with self._lock:
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[presented] = (now + self.cache_s, principal)
        return principal

    # --------------------------------------------------------------------------- the admin side
    def create(
        self,
        owner: str,
        scopes: str | list[str] | tuple[str, ...] = ("inference",),
        rate_per_s: float | None = None,
        tokens_per_min: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and its secret (shown this once; only its sha256 is kept)."""
        if not owner or not owner.strip():
            raise ValueError("a key needs an owner (the tenant whose requests it makes)")
        _positive("rate_per_s", rate_per_s)
        _positive("tokens_per_min", tokens_per_min)
        record = KeyRecord(
            "key_" + secrets.token_hex(8),
            owner.strip(),
            parse_scopes(scopes),
            None if rate_per_s is None else float(rate_per_s),
            None if tokens_per_min is None else int(tokens_per_min),
            int(time.time()),
        )
        secret = PREFIX + secrets.token_urlsafe(32)
        digest = key_digest(secret).hex()
        fields = {
            "owner": record.owner,
            "scopes": ",".join(record.scopes),
            "rate_per_s": "" if record.rate_per_s is None else repr(record.rate_per_s),
            "tokens_per_min": "" if record.tokens_per_min is None else str(record.tokens_per_min),
            "created_at": str(record.created_at),
            "revoked_at": "",
            "digest": digest,
        }
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(RECORD + record.key_id, mapping=fields)
            pipe.set(DIGEST + digest, record.key_id)
            pipe.sadd(INDEX, record.key_id)
            pipe.execute()
        return record, secret

    def get(self, key_id: str) -> KeyRecord | None:
        fields = self.redis.hgetall(RECORD + key_id)
        if not fields:
            return None
        return KeyRecord.from_hash(key_id, {k.decode(): v.decode() for k, v in fields.items()})

    def _existing(self, key_id: str) -> KeyRecord:
        record = self.get(key_id)
        if record is None:
            raise KeyError(f"no key {key_id!r} in the store")
        return record

    def list(self) -> list[KeyRecord]:
        """Every key (revoked ones too), oldest first; no secret is stored, so none is listed."""
        ids = sorted(i.decode() for i in self.redis.smembers(INDEX))
        with self.redis.pipeline(transaction=False) as pipe:  # one round trip for them all
            for key_id in ids:
                pipe.hgetall(RECORD + key_id)
            rows = pipe.execute()
        records = [
            KeyRecord.from_hash(i, {k.decode(): v.decode() for k, v in row.items()})
            for i, row in zip(ids, rows)
            if row
        ]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    def rotate(self, key_id: str) -> str:
        """A new secret for the key (same key_id, owner, scopes and limits); the old one is
        refused from now on (by every replica within ``cache_s``)."""
        record = self._existing(key_id)
        if record.revoked:
            raise ValueError(f"key {key_id} is revoked: create a new one")
        secret = PREFIX + secrets.token_urlsafe(32)
        digest = key_digest(secret).hex()
        old = self.redis.hget(RECORD + key_id, "digest")
        with self.redis.pipeline(transaction=True) as pipe:
            if old:
                pipe.delete(DIGEST + old.decode())
            pipe.set(DIGEST + digest, key_id)
            pipe.hset(RECORD + key_id, "digest", digest)
            pipe.execute()
        return secret

    def revoke(self, key_id: str) -> KeyRecord:
        """Refuse the key from now on; its record (and usage) stays, marked revoked."""
        self._existing(key_id)
        old = self.redis.hget(RECORD + key_id, "digest")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(RECORD + key_id, mapping={"revoked_at": str(int(time.time())), "digest": ""})
            if old:
                pipe.delete(DIGEST + old.decode())
            pipe.execute()
        return self._existing(key_id)
