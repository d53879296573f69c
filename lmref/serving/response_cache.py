"""The response cache: a finished greedy answer, kept to answer the same request again at once.

A greedy row (temperature 0) is a function of the model version, the prompt and the limits, so
its ``Finished`` can be stored and replayed (``cached=True``). ``ResponseCache`` is an in-process,
thread-safe LRU; ``lmref.production.shared_cache`` is a drop-in shared through Redis (same
``get`` / ``put`` / ``size``). ``cache_key`` says what makes two requests the same.

Usage::

    from lmref.serving.response_cache import ResponseCache, cache_key

    cache = ResponseCache(1024)                  # 0: off
    key = cache_key("base", request, "key_a")    # None: not cacheable (sampled)
    if key is not None and (hit := cache.get(key)) is None:
        cache.put(key, finished)
"""

from __future__ import annotations

import collections
import threading

from lmref.serving.request import Finished, Request


def cache_key(model_name: str, request: Request, tenant: str | None = None) -> tuple | None:
    """What makes two requests' answers equal: the model version, the prompt and every setting
    that changes the text or what is reported, and the tenant it was asked by (None: entries
    shared by every tenant, ``ServingConfig.shared_response_cache``); None for a sampled
    request (never cached). A tenant never gets another's answer: a hit's speed would tell it
    what the other asked."""
    p = request.params
    if p.temperature != 0:
        return None
    return (
        model_name,
        request.is_chat,
        repr(request.prompt),
        p.max_tokens,
        p.stop,
        p.ignore_eos,
        p.logprobs,
        p.echo,
        p.presence_penalty,
        p.frequency_penalty,
        p.logit_bias,
        p.grammar,
        p.tools,
        tenant,
    )


class ResponseCache:
    """A thread-safe LRU of finished greedy rows: same model, prompt and limits -> same text."""

    def __init__(self, size: int) -> None:
        self.size, self._lock = size, threading.Lock()
        self._items: collections.OrderedDict = collections.OrderedDict()

    def get(self, key) -> Finished | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value: Finished) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
