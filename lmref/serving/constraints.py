"""Structured output: a grammar per request, enforced inside the continuous batch by token masks.

A request with ``response_format`` (``json_object`` or ``json_schema``) carries a ``Grammar``;
when it is admitted the engine compiles it (once per grammar text: ``Grammars`` caches them)
into a matcher of its own. At every step ``Grammars.mask`` fills the allowed-token bitmask of
each constrained row and sets the logits of the other tokens to -inf in a copy of those rows
only, so unconstrained rows sample exactly what they would alone; ``Grammars.accept`` feeds
each sampled token to its matcher. EOS is allowed only where the grammar may end, and is the
only token allowed once it must end: a constrained row finishes with complete JSON (or at
``max_tokens``, "length", as OpenAI's does).

The grammar library is llguidance, chosen by ``benchmarks/grammar_mask.py`` (SmolLM2's 49k
vocabulary, one CPU thread): its mask per token was cheaper than xgrammar's (median 156 vs
255 us), it compiles a schema in ~1 ms, and it refuses the JSON-schema keywords it does not
implement by name (``not``, ``if``/``then``, ``uniqueItems``, ``contains``,
``dependentRequired``) where xgrammar 0.2.9 accepted them and would generate JSON that breaks
them: a client gets a 400 naming the keyword instead of output that silently violates its
schema. A ``Grammar`` of kind "lark" (llguidance's Lark dialect, JSON schemas embeddable with
``%json``) or "regex" is enforced the same way: what tool calls need for their arguments.

Usage::

    from lmref.serving.constraints import Grammar, Grammars, response_format

    grammar = response_format({"response_format": {"type": "json_object"}})  # or APIError 400
    grammars = Grammars(tokenizer, vocab_size=49152, eos_ids={2})
    row.matcher = grammars.matcher(grammar)        # EngineError ("invalid") if it cannot compile
    tokens = sample(grammars.mask(rows, logits), sampling).tolist()
    grammars.accept(rows, tokens)
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from lmref.serving.request import EngineError, Request
from lmref.serving.schema import bad

# Compact-ish JSON: one space after ':' and ',' (what chat models write, so their likeliest
# tokens stay allowed) and no free whitespace, which a weak model could repeat until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_schema", "lark", "regex")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name


@dataclass(frozen=True)
class Grammar:
    """What a row's output must match. ``kind``: "json_schema" (``source``: the schema as JSON
    text: equal texts share one compiled grammar and one cache key), "lark" or
    "regex" (llguidance's syntax)."""

    kind: str
    source: str

    @classmethod
    def json_schema(cls, schema: dict | bool) -> Grammar:
        # Key order kept: a schema's "properties" order is the order the JSON is written in.
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))


JSON_OBJECT = Grammar.json_schema({"type": "object"})  # response_format json_object


def response_format(body: dict) -> Grammar | None:
    """The request's ``response_format`` as a ``Grammar`` (None: plain text), or an ``APIError``
    (400, param ``response_format``) naming what is wrong with its shape."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("'response_format' must be an object", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind != "json_schema":
        raise bad(
            f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
            "response_format",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad("'response_format.json_schema' must be an object", "response_format")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad(
            "'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'",
            "response_format",
        )
    if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
        raise bad("'response_format.json_schema.strict' must be a boolean", "response_format")
    schema = spec.get("schema", {})  # OpenAI's default: any JSON value
    if not isinstance(schema, dict | bool):
        raise bad("'response_format.json_schema.schema' must be an object", "response_format")
    # strict or not, the schema is enforced (vLLM does the same): a grammar cannot half-apply.
    return Grammar.json_schema(schema)


class Grammars:
    """One model's grammar machinery: the tokenizer view (built at first use: servers that never
    see a response_format pay nothing), compiled grammars by text, and the per-step mask."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Iterable[int], cache_size: int = 256):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_ids = sorted(eos_ids)
        self.cache_size = cache_size
        self._ll_tokenizer: Any = None
        self._compiled: dict[Grammar, str] = {}
        self._lock = threading.Lock()
        # What masking cost: the engine's tests and notebook 06 report seconds per masked token.
        self.mask_seconds = 0.0
        self.masked_tokens = 0

    @property
    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_ids
                )
            return self._ll_tokenizer

    def compile(self, grammar: Grammar) -> str:
        """llguidance's grammar for ``grammar``, checked against the vocabulary; an
        ``EngineError`` ("invalid", param ``response_format``) with the library's message,
        which names the keyword it does not support."""
        if (found := self._compiled.get(grammar)) is not None:
            return found
        try:
            if grammar.kind == "json_schema":
                compiled = llguidance.LLMatcher.grammar_from_json_schema(
                    json.loads(grammar.source), defaults=JSON_OPTIONS
                )
            elif grammar.kind == "lark":
                compiled = llguidance.LLMatcher.grammar_from_lark(grammar.source)
            elif grammar.kind == "regex":
                compiled = llguidance.LLMatcher.grammar_from_regex(grammar.source)
            else:
                raise ValueError(f"unknown grammar kind {grammar.kind!r}; one of {KINDS}")
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                compiled, self.ll_tokenizer
            )
            if is_error:
                raise ValueError(messages[0])
        except ValueError as exc:  # llguidance raises ValueError for a schema it cannot take
            raise EngineError(
                "invalid",
                f"'response_format' is not supported by this server: {exc}",
                param="response_format",
                code="unsupported_schema",
            ) from None
        if len(self._compiled) >= self.cache_size:  # drop the oldest: dicts keep insertion order
            self._compiled.pop(next(iter(self._compiled)))
        self._compiled[grammar] = compiled
        return compiled

    def matcher(self, grammar: Grammar | None) -> Any:
        """A fresh matcher for one row (None for an unconstrained row)."""
        if grammar is None:
            return None
        return llguidance.LLMatcher(self.ll_tokenizer, self.compile(grammar))

    @torch.inference_mode()  # the logits are inference tensors: the masked copy is one too
    def mask(self, rows: Sequence[Request], logits: torch.Tensor) -> torch.Tensor:
        """``logits`` itself when no row is constrained; else a copy whose constrained rows have
        -inf for every token their grammar forbids (the raw logits stay for logprobs)."""
        constrained = [k for k, row in enumerate(rows) if row.matcher is not None]
        if not constrained:
            return logits
        start = time.perf_counter()
        bitmask = llguidance.torch.allocate_token_bitmask(len(constrained), self.vocab_size)
        for i, k in enumerate(constrained):
            llguidance.torch.fill_next_token_bitmask(rows[k].matcher, bitmask, i)
        index = torch.tensor(constrained, device=logits.device)
        picked = logits[index].float()
        llguidance.torch.apply_token_bitmask_inplace(picked, bitmask.to(logits.device))
        masked = logits.float().index_copy(0, index, picked)
        self.mask_seconds += time.perf_counter() - start
        self.masked_tokens += len(constrained)
        return masked

    def accept(self, rows: Sequence[Request], tokens: Sequence[int]) -> None:
        """Advance each constrained row's matcher by its sampled token."""
        for row, token in zip(rows, tokens):
            if row.matcher is not None and not row.matcher.consume_token(token):
                # Only a token the mask allowed is sampled: this is a bug, not a bad request.
                raise RuntimeError(f"grammar refused token {token}: {row.matcher.get_error()}")
