"""Per-key limits and usage in Redis, shared by every replica: a request rate (token bucket) and
a token quota per minute, each checked and charged atomically by a Lua script on Redis's clock.

- Rate: a bucket of ``burst`` requests (one second's worth, at least 1) refilled at
  ``rate_per_s``; a request takes one.
- Token quota: a bucket of ``tokens_per_min`` tokens refilled at ``tokens_per_min / 60`` a
  second. A request is let in while the bucket holds at least one token; when its response
  closes the real prompt + completion tokens are taken out, so the bucket can go below zero
  (requests already running when the quota ran out) and the key waits until it refills.
- Usage per key (``lmref:usage:<key_id>``, a hash): requests, prompt_tokens, completion_tokens
  (charged on close), refused (429s).

A refusal is ``(code, retry_after_s)``: ``rate_limit_exceeded`` or ``token_quota_exceeded`` and
the whole seconds until the same request would pass; ``too_many`` turns it into the 429 a client
sees (OpenAI's shape, ``Retry-After``). Redis errors propagate: the caller fails closed.

Usage::

    from lmref.production.connections import redis_client
    from lmref.production.limits import Limiter, too_many

    limiter = Limiter(redis_client("redis://127.0.0.1:6379/0"))
    refused = limiter.check(principal)            # None: go on
    if refused:
        raise too_many(*refused)                  # 429 + Retry-After
    limiter.charge(principal.key_id, principal.tokens_per_min, prompt=12, completion=30)
    limiter.usage(principal.key_id)               # {"requests": 1, "prompt_tokens": 12, ...}
"""

from __future__ import annotations

import math

import redis

from lmref.serving.auth import Principal
from lmref.serving.schema import APIError

RATE = "lmref:rate:"  # + key_id: the request bucket
QUOTA = "lmref:quota:"  # + key_id: the token bucket
USAGE = "lmref:usage:"  # + key_id: the usage counters
USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "refused")

# A bucket refilled at `rate` up to `cap` since it was last seen (Redis's clock, the same for
# every replica); stored as text so fractions survive (Lua numbers come back as integers).
_REFILL = """
local function refill(key, rate, cap, now)
  local b = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(b[1]) or cap
  local at = tonumber(b[2]) or now
  return math.min(cap, level + math.max(0, now - at) * rate)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function store(key, level, rate, cap)
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((cap - math.min(level, 0)) / rate * 1000) + 1000)
end
"""

# KEYS: rate bucket, quota bucket, usage. ARGV: rate_per_s, burst, tokens_per_min (0: no limit).
# Returns {0} (let in), {1, wait} (rate) or {2, wait} (quota), wait in seconds as text.
_CHECK = (
    _REFILL
    + """
local rate, burst, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 then
  local level = refill(KEYS[2], tpm / 60, tpm, now)
  if level < 1 then
    redis.call('HINCRBY', KEYS[3], 'refused', 1)
    return {2, tostring((1 - level) / (tpm / 60))}
  end
end
if rate > 0 then
  local level = refill(KEYS[1], rate, burst, now)
  if level < 1 then
    redis.call('HINCRBY', KEYS[3], 'refused', 1)
    return {1, tostring((1 - level) / rate)}
  end
  store(KEYS[1], level - 1, rate, burst)
end
return {0}
"""
)

# KEYS: quota bucket, usage. ARGV: tokens_per_min (0: no limit), prompt, completion tokens.
_CHARGE = (
    _REFILL
    + """
local tpm, prompt, completion = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 then
  local level = refill(KEYS[1], tpm / 60, tpm, now)
  store(KEYS[1], level - prompt - completion, tpm / 60, tpm)
end
redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', prompt)
redis.call('HINCRBY', KEYS[2], 'completion_tokens', completion)
return 1
"""
)

CODES = {1: "rate_limit_exceeded", 2: "token_quota_exceeded"}


def burst_of(rate_per_s: float) -> float:
    """The requests a key may send at once: one second's worth, at least one."""
    return max(1.0, rate_per_s)


def too_many(code: str, retry_after_s: int) -> APIError:
    """The 429 of a refused request, in OpenAI's shape, with ``Retry-After``."""
    what = "request rate limit" if code == "rate_limit_exceeded" else "token quota per minute"
    return APIError(
        429,
        f"this key is over its {what}; retry after {retry_after_s} s",
        "rate_limit_error",
        code=code,
        headers={"Retry-After": str(retry_after_s)},
    )


class Limiter:
    """Checks and charges keys' limits, and keeps their usage, in one Redis."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._check = client.register_script(_CHECK)
        self._charge = client.register_script(_CHARGE)

    def check(self, who: Principal) -> tuple[str, int] | None:
        """None when ``who`` may send a request now (it takes one from the rate bucket), else
        (code, whole seconds until it would pass)."""
        rate, tpm = who.rate_per_s or 0, who.tokens_per_min or 0
        if not rate and not tpm:
            return None
        keys = [RATE + who.key_id, QUOTA + who.key_id, USAGE + who.key_id]
        answer = self._check(keys=keys, args=[rate, burst_of(rate or 1), tpm])
        if int(answer[0]) == 0:
            return None
        return CODES[int(answer[0])], max(1, math.ceil(float(answer[1]) - 1e-9))

    def charge(
        self, key_id: str, tokens_per_min: int | None, prompt: int = 0, completion: int = 0
    ) -> None:
        """Count a request that was let in, and take its tokens out of the key's quota."""
        keys = [QUOTA + key_id, USAGE + key_id]
        self._charge(keys=keys, args=[tokens_per_min or 0, int(prompt), int(completion)])

    def usage(self, key_id: str) -> dict[str, int]:
        return self.usages([key_id])[key_id]

    def usages(self, key_ids: list[str]) -> dict[str, dict[str, int]]:
        """Each key's counters (zeros for a key never used), in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hmget(USAGE + key_id, USAGE_FIELDS)
            rows = pipe.execute()
        return {
            k: {f: int(v or 0) for f, v in zip(USAGE_FIELDS, row)} for k, row in zip(key_ids, rows)
        }
