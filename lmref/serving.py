"""A model server: OpenAI-compatible completions with streaming, dynamic batching, auth and metrics.

``create_app(config)`` builds a Flask app that serves one or more Hugging Face causal-LM folders
(base, fine-tuned, merged LoRA, quantized) the way vLLM, TGI and llama-server do, so the official
``openai`` client talks to it unchanged:

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming), ``GET /v1/models``,
  and a plain ``POST /predict``; errors in the OpenAI shape ``{"error": {...}}``.
- ``GET /health`` (liveness), ``GET /ready`` (503 until the models are loaded or while draining),
  ``GET /metrics`` (Prometheus, vLLM-like names with an ``lmref:`` prefix).
- Per model one worker thread owns model and tokenizer and runs queued requests as one batched
  generation; a bounded queue answers 429; a client that disconnects frees its slot.
- API keys (``Authorization: Bearer``), model versions, weighted A/B aliases, a response cache for
  greedy requests.
- Device and dtype from ``lmref.device`` (the project's one policy).

Usage::

    from lmref.serving import ModelSpec, ServingConfig, create_app, start_server

    config = ServingConfig(models=[ModelSpec("base", "artifacts/base")], api_keys=["sk-local"])
    # create_app(config) is the Flask (WSGI) app for any WSGI server; start_server runs it in
    server = start_server(config)              # waitress on 127.0.0.1, a free port, in a thread
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="sk-local")
    print(client.completions.create(model="base", prompt="def add(", max_tokens=16).choices[0].text)
    server.stop()

From a shell (one process, waitress, SIGTERM drains): ``python -m lmref.serve --model base=artifacts/base``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import itertools
import json
import logging
import math
import os
import queue
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from flask import Flask, Response, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from werkzeug.exceptions import HTTPException

from lmref.device import compute_dtype, resolve_device

log = logging.getLogger("lmref.serving")

# Used when the tokenizer brings no chat template (a base model): plain role markers, and the
# next "<|user|>" marker is treated as a stop so a base model does not write the user's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_CHAT_STOP = ("<|user|>",)
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
_LOAD_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------- config
@dataclass
class ModelSpec:
    """One served model version: a name clients use and a Hugging Face folder (safetensors)."""

    name: str
    path: str
    max_batch_size: int = 16        # rows (prompts) in one batched generation; 1 turns batching off
    batch_wait_ms: float = 5.0      # how long the worker gathers requests before it starts a batch
    max_queue_size: int = 256       # rows waiting; more -> 429 with Retry-After
    device: str = "auto"            # cuda when present, else cpu
    chat_template: str | None = None  # Jinja; None: the tokenizer's, else DEFAULT_CHAT_TEMPLATE
    dtype: str = "auto"             # bf16 on GPUs that support it, fp32 on CPU


@dataclass
class ServingConfig:
    """Everything ``create_app`` needs. ``api_keys=None`` reads env ``LMREF_API_KEYS`` (comma list);
    an empty list means no auth (loopback demos only)."""

    models: list[ModelSpec]
    aliases: dict[str, dict[str, float]] = field(default_factory=dict)  # {"prod": {"v1": .9, "v2": .1}}
    default_model: str | None = None          # used when a request names no model; first by default
    api_keys: list[str] | None = None
    max_content_length: int = 1 << 20         # bytes of request body (413 above)
    max_stop_strings: int = 4
    default_max_tokens: int = 16
    max_tokens_limit: int | None = None       # an operator cap below the context length
    cache_size: int = 1024                    # greedy responses kept (LRU); 0 turns the cache off
    load_in_background: bool = True           # /ready says 503 until loaded
    torch_threads: int | None = None          # torch.set_num_threads; small models: 1 is fastest
    drain_timeout_s: float = 30.0             # SIGTERM: how long in-flight requests may finish
    host: str = "127.0.0.1"                   # loopback unless told otherwise
    port: int = 8000
    server_threads: int = 64                  # waitress threads: one per concurrent request


class APIError(Exception):
    """An error a client sees, in the OpenAI shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_HTTP_ERRORS = {  # werkzeug's own errors mapped to OpenAI error types and codes
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "queue_full"),
    503: ("service_unavailable_error", "unavailable"),
}


# ----------------------------------------------------------------------------------- metrics
class ServingMetrics:
    """Prometheus metrics, named like vLLM's (``vllm:`` -> ``lmref:``), in a registry per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.http_requests = Counter("lmref:http_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.e2e_latency = Histogram("lmref:e2e_request_latency_seconds", "End-to-end latency",
                                     ["model_name"], buckets=latency, registry=r)
        self.ttft = Histogram("lmref:time_to_first_token_seconds", "Time to first token",
                              ["model_name"], buckets=latency, registry=r)
        self.itl = Histogram("lmref:inter_token_latency_seconds", "Time between output tokens",
                             ["model_name"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                      0.1, 0.25, 0.5, 1), registry=r)
        self.prompt_tokens = Counter("lmref:prompt_tokens", "Prompt tokens processed",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter("lmref:generation_tokens", "Tokens generated",
                                         ["model_name"], registry=r)
        self.request_success = Counter("lmref:request_success", "Finished sequences by reason",
                                       ["model_name", "finished_reason"], registry=r)
        self.running = Gauge("lmref:num_requests_running", "Sequences in the running batch",
                             ["model_name"], registry=r)
        self.waiting = Gauge("lmref:num_requests_waiting", "Sequences waiting in the queue",
                             ["model_name"], registry=r)
        self.batch_size = Histogram("lmref:batch_size", "Sequences per batched generation",
                                    ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.cache_hits = Counter("lmref:response_cache_hits", "Greedy responses served from cache",
                                  ["model_name"], registry=r)
        self.cache_misses = Counter("lmref:response_cache_misses", "Greedy requests not in cache",
                                    ["model_name"], registry=r)


class ResponseCache:
    """A thread-safe LRU of finished greedy completions: same model, prompt and limits -> same text."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> tuple | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value: tuple) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# ----------------------------------------------------------------------------------- engine
@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class _Row:
    """One prompt being generated: its state lives in the worker thread only."""

    def __init__(self, job: _Job, index: int, prompt: str | list, params: SamplingParams,
                 is_chat: bool, cache_key=None):
        self.job, self.index, self.prompt, self.params = job, index, prompt, params
        self.is_chat, self.cache_key = is_chat, cache_key
        self.prompt_ids: list[int] = []
        self.out_ids: list[int] = []
        self.completion_tokens = 0
        self.emitted = 0                # characters of text already sent to a streaming client
        self.search_from = 0            # where the next stop-string search starts
        self.text = ""
        self.finished = False
        self.last_token_at = 0.0
        self.generator: torch.Generator | None = None


class _Job:
    """One HTTP request: its rows are batched together; events flow back on ``events``."""

    def __init__(self, model_name: str, stream: bool):
        self.model_name, self.stream = model_name, stream
        self.rows: list[_Row] = []
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.arrival = time.perf_counter()
        self.rows_total = 0             # rows including those answered from the cache


class QueueFull(Exception):
    pass


class Engine:
    """One model version: a worker thread that owns model and tokenizer and batches requests.

    Only the worker touches the tokenizer: a fast (Rust) tokenizer used by several threads at once
    raises "Already borrowed" when one thread changes its padding/truncation state mid-call.
    """

    def __init__(self, spec: ModelSpec, metrics: ServingMetrics, cache: ResponseCache):
        self.spec, self.metrics, self.cache = spec, metrics, cache
        self.model = self.tokenizer = None
        self.context_length = 0
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._waiting_rows = 0
        self._running_jobs: list[_Job] = []
        self._closed = False
        self._abort_message: str | None = None
        self._thread = threading.Thread(target=self._work, name=f"engine-{spec.name}", daemon=True)
        self._labels = {"model_name": spec.name}
        metrics.waiting.labels(**self._labels).set(0)
        metrics.running.labels(**self._labels).set(0)
        # Labelled children looked up once: the decode loop touches them for every token.
        self._ttft = metrics.ttft.labels(**self._labels)
        self._itl = metrics.itl.labels(**self._labels)
        self._generated = metrics.generation_tokens.labels(**self._labels)

    # -- lifecycle
    def start(self) -> None:
        self._thread.start()

    def _load(self) -> None:
        device = resolve_device(self.spec.device)
        dtype = compute_dtype(device) if self.spec.dtype == "auto" else self.spec.dtype
        # Weights from safetensors only: a pickled pytorch_model.bin can run code when loaded.
        # One load at a time: from_pretrained switches process-wide init state (meta device),
        # so two threads loading at once corrupt each other's model.
        # transformers' lazy imports are not thread-safe either.
        with _LOAD_LOCK:
            from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

            self._cache_class = DynamicCache
            model = AutoModelForCausalLM.from_pretrained(self.spec.path, dtype=dtype,
                                                         use_safetensors=True)
            self.model = model.to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.spec.path)
        cfg = model.config.get_text_config(decoder=True)
        self.context_length = int(getattr(cfg, "max_position_embeddings", None)
                                  or getattr(cfg, "n_positions", 2048))
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None \
            else model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (next(iter(self.eos_ids), 0))
        self.device = device

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None

    def close(self, abort_message: str | None = "server is shutting down") -> None:
        """Stop the worker; queued and running requests get a 503 error event."""
        with self._cond:
            self._closed = True
            self._abort_message = abort_message
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._waiting_rows = 0
            self._cond.notify_all()
        for job in waiting:
            job.events.put(("error", APIError(503, abort_message or "shutting down",
                                              "service_unavailable_error", code="shutting_down")))
        self.metrics.waiting.labels(**self._labels).set(0)

    def in_flight(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._running_jobs)

    # -- request side
    def submit(self, job: _Job) -> None:
        rows = len(job.rows)
        with self._cond:
            if self._closed:
                raise APIError(503, "server is shutting down", "service_unavailable_error",
                               code="shutting_down")
            if self._waiting_rows + rows > self.spec.max_queue_size:
                raise QueueFull()
            self._waiting.append(job)
            self._waiting_rows += rows
            self.metrics.waiting.labels(**self._labels).set(self._waiting_rows)
            self._cond.notify_all()

    def cancel(self, job: _Job) -> None:
        """A client went away: drop its queued rows now, running rows at the next decode step."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._waiting_rows -= len(job.rows)
                self.metrics.waiting.labels(**self._labels).set(self._waiting_rows)
                self.metrics.request_success.labels(finished_reason="abort", **self._labels).inc(
                    len(job.rows))

    # -- worker side
    def _work(self) -> None:
        try:
            self._load()
        except Exception as exc:  # a broken folder must not kill the process: /ready reports it
            log.exception("loading %s failed", self.spec.path)
            self.load_error = f"{type(exc).__name__}: {exc}"
        self.loaded.set()
        if self.load_error:
            return
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            try:
                self._run_batch(jobs)
            except Exception:
                log.exception("batch failed")
                for job in jobs:
                    job.events.put(("error", APIError(500, "generation failed", "server_error",
                                                      code="internal_error")))
            finally:
                with self._cond:
                    self._running_jobs = []
                self.metrics.running.labels(**self._labels).set(0)

    def _next_batch(self) -> list[_Job] | None:
        spec = self.spec
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # Gather for up to batch_wait_ms after the oldest request arrived, or until full.
            deadline = self._waiting[0].arrival + spec.batch_wait_ms / 1000
            while self._waiting_rows < spec.max_batch_size and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs, rows = [], 0
            while self._waiting and (not jobs or rows + len(self._waiting[0].rows)
                                     <= spec.max_batch_size):
                job = self._waiting.popleft()
                jobs.append(job)
                rows += len(job.rows)
            self._waiting_rows -= rows
            self._running_jobs = jobs
            self.metrics.waiting.labels(**self._labels).set(self._waiting_rows)
            return jobs

    def _encode(self, row: _Row) -> list[int]:
        tok = self.tokenizer
        if row.is_chat:
            template = self.spec.chat_template or tok.chat_template or DEFAULT_CHAT_TEMPLATE
            text = tok.apply_chat_template(row.prompt, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=tok.chat_template is None)["input_ids"]
        else:
            ids = tok(row.prompt)["input_ids"]
        if not ids:
            if tok.bos_token_id is None:
                raise APIError(400, "prompt is empty", param="prompt", code="empty_prompt")
            ids = [tok.bos_token_id]
        limit = self.context_length
        if len(ids) + row.params.max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the "
                                f"prompt has {len(ids)} and max_tokens is {row.params.max_tokens}.",
                           param="max_tokens", code="context_length_exceeded")
        return ids

    def _run_batch(self, jobs: list[_Job]) -> None:
        rows: list[_Row] = []
        for job in jobs:
            if job.cancelled.is_set():
                continue
            try:
                for row in job.rows:
                    row.prompt_ids = self._encode(row)
            except APIError as err:
                job.events.put(("error", err))
                continue
            job.events.put(("admitted",))
            rows.extend(job.rows)
        if not rows:
            return
        labels = self._labels
        self.metrics.batch_size.labels(**labels).observe(len(rows))
        self.metrics.running.labels(**labels).set(len(rows))
        for row in rows:
            self.metrics.prompt_tokens.labels(**labels).inc(len(row.prompt_ids))
            if row.params.temperature >= 1e-5:
                row.generator = torch.Generator(device=self.device)
                seed = row.params.seed if row.params.seed is not None else secrets.randbits(63)
                row.generator.manual_seed(seed % (1 << 63))
        self._decode(rows)

    @torch.inference_mode()
    def _decode(self, rows: list[_Row]) -> None:
        # A hand-written decode loop instead of model.generate(): generate() applies ONE
        # temperature/top_p/seed/stop/max_new_tokens to the whole batch, while a server batches
        # requests that each bring their own. The loop is the same idea as generate's: one
        # prefill over the left-padded prompts, then one forward per token with the KV cache
        # (DynamicCache), dropping finished rows from the cache so they cost nothing more.
        model, device = self.model, self.device
        longest = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last prompt token is at -1
            input_ids[i, longest - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            attention[i, longest - len(row.prompt_ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        # Positions count real tokens only, so a padded row sees the positions it would alone.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = self._cache_class(config=model.config)
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        next_position = positions[:, -1:] + 1
        active = list(range(len(rows)))
        while True:
            tokens = self._sample(logits, [rows[i] for i in active])
            now = time.perf_counter()
            keep = []
            for k, (i, token) in enumerate(zip(active, tokens)):
                row = rows[i]
                if row.job.cancelled.is_set() or self._abort_message is not None and self._closed:
                    self._finish(row, "abort", now)
                    continue
                if not self._append(row, token, now):
                    keep.append(k)
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention, next_position = attention[index], next_position[index]
                active = [active[k] for k in keep]
                tokens = [tokens[k] for k in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
            step = torch.tensor(tokens, device=device).unsqueeze(1)
            logits = model(input_ids=step, attention_mask=attention, position_ids=next_position,
                           past_key_values=cache, use_cache=True).logits[:, -1, :]
            next_position = next_position + 1
            self.metrics.running.labels(**self._labels).set(len(active))

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Per-row sampling: greedy, or temperature + top-p with the row's own seeded generator,
        so a seeded request gives the same text whatever else shares its batch."""
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for k, row in enumerate(rows):
            p = row.params
            if p.temperature < 1e-5:  # dividing by ~0 overflows: that limit is greedy anyway
                tokens.append(greedy[k])
                continue
            probs = torch.softmax(logits[k].float() / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs >= p.top_p  # always keeps the top one
                sorted_probs = sorted_probs.masked_fill(outside, 0.0)
                choice = torch.multinomial(sorted_probs, 1, generator=row.generator)
                tokens.append(int(order[choice]))
            else:
                tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return tokens

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _append(self, row: _Row, token: int, now: float) -> bool:
        """Add one token to a row; returns True when the row is finished."""
        if row.completion_tokens == 0:
            self._ttft.observe(now - row.job.arrival)
        else:
            self._itl.observe(now - row.last_token_at)
        row.last_token_at = now
        row.completion_tokens += 1
        self._generated.inc()
        if token in self.eos_ids and not row.params.ignore_eos:
            self._finish(row, "stop", now)
            return True
        row.out_ids.append(token)
        stops = row.params.stop
        if stops or row.job.stream:
            text = self._decode_text(row.out_ids)
            if stops:
                hits = [i for i in (text.find(s, row.search_from) for s in stops) if i >= 0]
                if hits:
                    row.text = text[:min(hits)]
                    self._finish(row, "stop", now, decoded=True)
                    return True
                row.search_from = max(0, len(text) - max(map(len, stops)) + 1)
            if row.job.stream:
                safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character waits
                safe -= _held_back(text[:safe], stops)  # a possible stop-string start waits
                if safe > row.emitted:
                    row.job.events.put(("delta", row.index, text[row.emitted:safe]))
                    row.emitted = safe
        if row.completion_tokens >= row.params.max_tokens:
            self._finish(row, "length", now)
            return True
        return False

    def _finish(self, row: _Row, reason: str, now: float, decoded: bool = False) -> None:
        row.finished = True
        labels = self._labels
        if not decoded:
            row.text = self._decode_text(row.out_ids)
        if reason == "abort":
            self.metrics.request_success.labels(finished_reason="abort", **labels).inc()
            if self._closed and self._abort_message and not row.job.cancelled.is_set():
                row.job.events.put(("error", APIError(503, self._abort_message,
                                                      "service_unavailable_error",
                                                      code="shutting_down")))
            return
        if row.job.stream and len(row.text) > row.emitted:
            row.job.events.put(("delta", row.index, row.text[row.emitted:]))
            row.emitted = len(row.text)
        self.metrics.request_success.labels(finished_reason=reason, **labels).inc()
        self.metrics.e2e_latency.labels(**labels).observe(now - row.job.arrival)
        result = (row.text, reason, len(row.prompt_ids), row.completion_tokens)
        if row.cache_key is not None:
            self.cache.put(row.cache_key, result)
        row.job.events.put(("finish", row.index) + result)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


# ----------------------------------------------------------------------------------- validation
def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number", name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise _bad(f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer", name)
    if value < low or value > high:
        raise _bad(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"'{param}' must be a string", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"'{param}' is not valid unicode", param) from None
    return value


def _sampling(body: dict, config: ServingConfig, chat: bool) -> SamplingParams:
    for name, allowed in (("n", 1), ("best_of", 1)):
        if body.get(name) not in (None, allowed):
            raise _bad(f"only {name}={allowed} is supported", name)
    if body.get("echo") not in (None, False) or body.get("logprobs") not in (None, False):
        raise _bad("echo and logprobs are not supported", "logprobs")
    limit = config.max_tokens_limit or (1 << 31)
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _integer(body, name, config.default_max_tokens, 1, limit)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list):
        stops = tuple(stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > config.max_stop_strings:
        raise _bad(f"at most {config.max_stop_strings} stop strings are allowed", "stop")
    for s in stops:
        if not _text(s, "stop"):
            raise _bad("stop strings must not be empty", "stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=_integer(body, "seed", None, -(1 << 63), (1 << 64) - 1),
        stop=stops, ignore_eos=ignore_eos)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _bad("'stream_options.include_usage' must be a boolean", "stream_options")
    return stream, include


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > 256:
        raise _bad("'messages' must be a non-empty list of messages", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                              "assistant"):
            raise _bad("each message needs a role: system, developer, user or assistant",
                       "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is served here
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise _bad("only text content parts are supported", "messages")
                parts.append(_text(part.get("text"), "messages"))
            content = "".join(parts)
        clean.append({"role": m["role"], "content": _text(content, "messages")})
    return clean


# ----------------------------------------------------------------------------------- app
class ServingState:
    """What one app holds: engines per model version, aliases, keys, cache, metrics, drain flag."""

    def __init__(self, config: ServingConfig):
        if not config.models:
            raise ValueError("ServingConfig.models is empty: serve at least one model")
        names = [m.name for m in config.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        for alias, split in config.aliases.items():
            if alias in names or not split or any(v not in names for v in split) \
                    or any(w <= 0 for w in split.values()):
                raise ValueError(f"alias {alias!r} must name served versions with weights > 0")
        self.config = config
        self.metrics = ServingMetrics()
        self.cache = ResponseCache(config.cache_size)
        self.engines = {m.name: Engine(m, self.metrics, self.cache) for m in config.models}
        self.default_model = config.default_model or names[0]
        keys = config.api_keys
        if keys is None:
            keys = [k.strip() for k in os.environ.get("LMREF_API_KEYS", "").split(",") if k.strip()]
        # Digests, so compare_digest compares equal-length values and no key sits in memory twice.
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.draining = threading.Event()
        self._inflight = 0
        self._inflight_lock = threading.Condition()
        self.created = int(time.time())

    def start(self) -> None:
        for engine in self.engines.values():
            engine.start()

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines.values()) and not self.draining.is_set()

    def resolve(self, name: Any, user: Any) -> Engine:
        if name is None:
            name = self.default_model
        if not isinstance(name, str):
            raise _bad("'model' must be a string", "model")
        split = self.config.aliases.get(name)
        if split:
            versions, weights = list(split), list(split.values())
            if isinstance(user, str) and user:  # sticky: one user always sees one version
                point = int.from_bytes(hashlib.sha256(user.encode("utf-8", "replace")).digest()[:8],
                                       "big") / 2**64 * sum(weights)
                for name, w in zip(versions, weights):  # noqa: B007
                    if point < w:
                        break
                    point -= w
            else:
                name = random.choices(versions, weights)[0]
        engine = self.engines.get(name)
        if engine is None:
            raise APIError(404, f"The model '{name}' does not exist", "not_found_error",
                           param="model", code="model_not_found")
        if engine.load_error:
            raise APIError(503, f"model '{name}' failed to load", "service_unavailable_error",
                           code="model_load_failed")
        if not engine.loaded.is_set():
            raise APIError(503, f"model '{name}' is loading", "service_unavailable_error",
                           code="model_loading", headers={"Retry-After": "2"})
        return engine

    def authorized(self, header: str | None) -> bool:
        if not self.key_digests:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        presented = hashlib.sha256(header[7:].strip().encode("utf-8", "replace")).digest()
        ok = False
        for digest in self.key_digests:  # no early exit: time does not depend on which key matched
            ok |= secrets.compare_digest(digest, presented)
        return ok

    def enter(self) -> None:
        with self._inflight_lock:
            self._inflight += 1

    def leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1
            self._inflight_lock.notify_all()

    def begin_drain(self) -> None:
        self.draining.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until in-flight HTTP requests are done; False when the timeout ran out first."""
        deadline = time.monotonic() + timeout
        with self._inflight_lock:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._inflight_lock.wait(left)
        return True

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


def _parse_json() -> dict:
    if request.mimetype != "application/json":
        raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
    raw = request.get_data(cache=False)  # raises 413 above MAX_CONTENT_LENGTH

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def create_app(config: ServingConfig, start: bool = True) -> Flask:
    """The Flask app. ``start`` launches the model workers (they load in the background unless
    ``config.load_in_background`` is False). The state is in ``app.extensions["lmref"]``."""
    state = ServingState(config)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=config.max_content_length, DEBUG=False,
                      PROPAGATE_EXCEPTIONS=False, TRAP_HTTP_EXCEPTIONS=False)
    app.json.sort_keys = False
    app.extensions["lmref"] = state
    metrics = state.metrics

    def error_response(err: APIError) -> Response:
        response = app.response_class(json.dumps(err.body()), status=err.status,
                                      mimetype="application/json")
        for k, v in err.headers.items():
            response.headers[k] = v
        return response

    @app.errorhandler(APIError)
    def _api_error(err: APIError):
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        type_, code = _HTTP_ERRORS.get(err.code or 500, ("invalid_request_error", None))
        message = {404: "not found: " + request.path, 413: "request body too large"}.get(
            err.code, err.description or err.name)
        return error_response(APIError(err.code or 500, message, type_, code=code))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):  # logged here; the client never sees a traceback
        log.exception("unhandled error on %s", request.path)
        return error_response(APIError(500, "internal server error", "server_error",
                                       code="internal_error"))

    @app.before_request
    def _guard():
        if request.path in PUBLIC_PATHS:
            return None
        if not state.authorized(request.headers.get("Authorization")):
            raise APIError(401, "Incorrect or missing API key (Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if state.draining.is_set():
            raise APIError(503, "server is shutting down", "service_unavailable_error",
                           code="shutting_down", headers={"Retry-After": "5"})
        state.enter()
        request.environ["lmref.counted"] = True
        return None

    @app.after_request
    def _count(response: Response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.http_requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        if request.environ.pop("lmref.counted", False):
            response.call_on_close(state.leave)
        return response

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        models = {n: ("ready" if e.ready else e.load_error or "loading")
                  for n, e in state.engines.items()}
        status = 200 if state.ready else 503
        return {"status": "ready" if status == 200 else
                ("draining" if state.draining.is_set() else "loading"), "models": models}, status

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models():
        data = [{"id": n, "object": "model", "created": state.created, "owned_by": "lmref",
                 "max_model_len": e.context_length or None, "ready": e.ready}
                for n, e in state.engines.items()]
        data += [{"id": a, "object": "model", "created": state.created, "owned_by": "lmref",
                  "routes": split} for a, split in config.aliases.items()]
        return {"object": "list", "data": data}

    def submit(body: dict, chat: bool) -> tuple[Engine, _Job, SamplingParams, bool]:
        engine = state.resolve(body.get("model"), body.get("user"))
        params = _sampling(body, config, chat)
        stream, _ = _stream_flags(body)
        if chat:
            prompts: list = [_messages(body)]
            if engine.spec.chat_template is None and engine.tokenizer.chat_template is None:
                params.stop = params.stop + DEFAULT_CHAT_STOP
        else:
            prompt = body.get("prompt")
            prompts = prompt if isinstance(prompt, list) else [prompt]
            if not prompts or len(prompts) > 64:
                raise _bad("'prompt' must be a string or a non-empty list of strings", "prompt")
            prompts = [_text(p, "prompt") for p in prompts]
        job = _Job(engine.spec.name, stream)
        job.rows_total = len(prompts)
        for i, prompt in enumerate(prompts):
            key = None
            if params.temperature == 0 and config.cache_size > 0:
                key = (engine.spec.name, chat, json.dumps(prompt, sort_keys=True),
                       params.max_tokens, params.stop, params.ignore_eos)
            job.rows.append(_Row(job, i, prompt, params, chat, key))
        cached = []
        for row in job.rows:
            hit = state.cache.get(row.cache_key) if row.cache_key is not None else None
            if row.cache_key is not None:
                (metrics.cache_hits if hit else metrics.cache_misses).labels(
                    model_name=engine.spec.name).inc()
            if hit:
                cached.append(row)
                row.job.events.put(("cached", row.index) + hit)
        job.rows = [r for r in job.rows if r not in cached]
        if job.rows:
            try:
                engine.submit(job)
            except QueueFull:
                raise APIError(429, "The server is busy: the request queue is full",
                               "rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"}) from None
        else:
            job.events.put(("admitted",))
        return engine, job, params, stream

    def events(engine: Engine, job: _Job):
        """Yield the job's events until all rows finished; a vanished client cancels the job."""
        disconnected = request.environ.get("waitress.client_disconnected", lambda: False)
        finished = 0
        try:
            while finished < job.rows_total:
                try:
                    event = job.events.get(timeout=0.25)
                except queue.Empty:
                    event = None
                if disconnected():
                    engine.cancel(job)
                    return
                if event is None:
                    continue
                if event[0] in ("finish", "cached"):
                    finished += 1
                yield event
        finally:
            if finished < job.rows_total:
                engine.cancel(job)

    def first_admission(stream_events):
        """Wait for admission, so a prompt that is too long is still an HTTP 400, not a stream."""
        buffered = []
        for event in stream_events:
            if event[0] == "error":
                raise event[1]
            if event[0] == "admitted":
                return buffered
            buffered.append(event)
        return buffered

    def collect(engine: Engine, job: _Job) -> tuple[list, dict]:
        choices: dict[int, tuple] = {}
        for event in events(engine, job):
            if event[0] == "error":
                raise event[1]
            if event[0] in ("finish", "cached"):
                choices[event[1]] = event[2:]
        if len(choices) < job.rows_total:  # the client went away; nobody reads this
            raise APIError(499, "client closed request", code="client_closed")
        ordered = [choices[i] for i in range(job.rows_total)]
        usage = {"prompt_tokens": sum(c[2] for c in ordered),
                 "completion_tokens": sum(c[3] for c in ordered)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return ordered, usage

    def completion(chat: bool):
        body = _parse_json()
        engine, job, params, stream = submit(body, chat)
        _, include_usage = _stream_flags(body)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        model = engine.spec.name
        if not stream:
            choices, usage = collect(engine, job)
            if chat:
                out = [{"index": i, "message": {"role": "assistant", "content": c[0]},
                        "logprobs": None, "finish_reason": c[1]} for i, c in enumerate(choices)]
            else:
                out = [{"index": i, "text": c[0], "logprobs": None, "finish_reason": c[1]}
                       for i, c in enumerate(choices)]
            return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                    "created": created, "model": model, "choices": out, "usage": usage}
        source = events(engine, job)
        buffered = first_admission(source)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text is not None else {})
                choice = {"index": index, "delta": delta, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None,
                          "finish_reason": finish}
            payload = {"id": rid, "object": kind, "created": created, "model": model,
                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return payload

        def generate():
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            try:
                if chat:
                    for i in range(job.rows_total):
                        yield _sse(chunk(i, None, None, role=True))
                pending: list[str] = []
                event: tuple = ("none",)
                for event in itertools.chain(buffered, source):
                    if event[0] == "delta":
                        pending.append(_sse(chunk(event[1], event[2], None)))
                    elif event[0] in ("finish", "cached"):
                        kind_, index, text, reason, n_prompt, n_completion = event
                        usage["prompt_tokens"] += n_prompt
                        usage["completion_tokens"] += n_completion
                        if kind_ == "cached" and text:  # no deltas came: send the text at once
                            pending.append(_sse(chunk(index, text, None)))
                        pending.append(_sse(chunk(index, None, reason)))
                    elif event[0] == "error":
                        pending.append(_sse(event[1].body()))
                        break
                    # One write for all the events already waiting: under load a thread that
                    # fell behind catches up with one socket write instead of one per token.
                    if pending and job.events.empty():
                        yield "".join(pending)
                        pending = []
                if pending:
                    yield "".join(pending)
                if event[0] != "error" and include_usage:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield _sse({"id": rid, "object": kind, "created": created, "model": model,
                                "choices": [], "usage": usage})
            except Exception:  # after the headers went out an error can only be an event
                log.exception("stream failed")
                yield _sse(APIError(500, "internal server error", "server_error",
                                    code="internal_error").body())
            finally:
                source.close()  # a client that went away cancels its rows (see events())
            yield _sse("[DONE]")

        return Response(generate(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    def completions():
        return completion(chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return completion(chat=True)

    @app.post("/predict")
    def predict():
        """The simplest case: {"prompt": "..."} -> {"completion": "...", ...}; greedy by default."""
        body = _parse_json()
        body = {"temperature": 0.0, **body, "stream": False}
        if not isinstance(body.get("prompt"), str):
            raise _bad("'prompt' must be a string", "prompt")
        engine, job, _, _ = submit(body, chat=False)
        choices, usage = collect(engine, job)
        return {"model": engine.spec.name, "completion": choices[0][0],
                "finish_reason": choices[0][1], "usage": usage}

    if start:
        state.start()
        if not config.load_in_background:
            for engine in state.engines.values():
                engine.loaded.wait()
    return app


# ----------------------------------------------------------------------------------- running it
class ServerHandle:
    """A waitress server running in a thread of this process (tests, notebooks, benchmarks)."""

    def __init__(self, app: Flask, server, thread: threading.Thread, stop: threading.Event):
        self.app, self.server, self.thread, self._stop = app, server, thread, stop
        self.state: ServingState = app.extensions["lmref"]
        self.url = f"http://127.0.0.1:{server.effective_port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.state.ready:
            errors = [e.load_error for e in self.state.engines.values() if e.load_error]
            if errors:
                raise RuntimeError(f"model failed to load: {errors}")
            if time.monotonic() > deadline:
                raise TimeoutError("models did not load in time")
            time.sleep(0.05)

    def stop(self, drain_timeout: float | None = None) -> bool:
        """Drain (new requests get 503), wait for in-flight ones, then close. True when drained."""
        state = self.state
        state.begin_drain()
        drained = state.wait_idle(state.config.drain_timeout_s if drain_timeout is None
                                  else drain_timeout)
        state.close()
        if not drained:
            state.wait_idle(2.0)  # aborted streams still send their error event
        self._stop.set()
        self.thread.join(timeout=10)
        return drained


def _run_waitress(server, stop: threading.Event) -> None:
    """waitress's loop, polled until ``stop`` is set, then everything closed in this thread:
    the listener, the worker threads and open keep-alive connections (a single-socket server's
    own close() leaves those, and closing sockets from another thread races the poll)."""
    from waitress import wasyncore

    while not stop.is_set():
        wasyncore.loop(timeout=0.1, map=server._map, count=1)
    server.close()
    server.task_dispatcher.shutdown(timeout=5)
    wasyncore.close_all(server._map, ignore_all=True)


def _waitress_server(app: Flask, config: ServingConfig, port: int):
    from waitress.server import create_server

    # threads: every waiting or streaming request holds a waitress thread, so the batcher can
    # only batch as many requests as there are threads. channel_request_lookahead lets waitress
    # notice a client that disconnected while its request runs.
    # connection_limit: idle keep-alive connections count too; at the limit waitress stops
    # accepting, and new clients would wait for old idle ones to time out.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a queue is normal under load
    return create_server(app, host=config.host, port=port, threads=config.server_threads,
                         channel_request_lookahead=1, expose_tracebacks=False, ident="lmref",
                         connection_limit=max(1000, 4 * config.server_threads))


def start_server(config: ServingConfig, port: int = 0, wait: bool = True) -> ServerHandle:
    """Serve ``config`` with waitress in a background thread on ``config.host`` (port 0: free).
    ``config.torch_threads`` is applied to this whole process."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    app = create_app(config)
    server = _waitress_server(app, config, port)
    stop = threading.Event()
    thread = threading.Thread(target=_run_waitress, args=(server, stop), name="waitress",
                              daemon=True)
    thread.start()
    handle = ServerHandle(app, server, thread, stop)
    if wait:
        handle.wait_ready()
    return handle


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve Hugging Face causal LMs, OpenAI-compatible.")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model version to serve (repeatable); the first is the default")
    p.add_argument("--alias", action="append", default=[], metavar="NAME=V1:W1,V2:W2",
                   help="an A/B alias splitting traffic by weight, e.g. prod=v1:0.9,v2:0.1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--threads", type=int, default=64, help="waitress worker threads")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue-size", type=int, default=256)
    p.add_argument("--cache-size", type=int, default=1024)
    p.add_argument("--max-tokens-limit", type=int, default=None)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (text, or a file path) for every --model")
    p.add_argument("--unbatched", action="append", default=[], metavar="NAME",
                   help="also serve NAME-unbatched: the same weights with max_batch_size=1")
    return p


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    template = args.chat_template
    if template and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            template = f.read()
    specs = []
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model takes NAME=PATH, got {item!r}")
        specs.append(ModelSpec(name, path, max_batch_size=args.max_batch_size,
                               batch_wait_ms=args.batch_wait_ms, max_queue_size=args.max_queue_size,
                               chat_template=template))
    for name in args.unbatched:
        base = next((s for s in specs if s.name == name), None)
        if base is None:
            raise SystemExit(f"--unbatched {name}: no such --model")
        specs.append(ModelSpec(f"{name}-unbatched", base.path, max_batch_size=1, batch_wait_ms=0,
                               max_queue_size=args.max_queue_size, chat_template=template))
    aliases = {}
    for item in args.alias:
        name, _, routes = item.partition("=")
        try:
            aliases[name] = {v: float(w) for v, w in (r.split(":") for r in routes.split(","))}
        except ValueError:
            raise SystemExit(f"--alias takes NAME=V1:W1,V2:W2, got {item!r}") from None
    return ServingConfig(models=specs, aliases=aliases, host=args.host, port=args.port,
                         server_threads=args.threads, torch_threads=args.torch_threads,
                         cache_size=args.cache_size, max_tokens_limit=args.max_tokens_limit,
                         drain_timeout_s=args.drain_timeout)


def serve(config: ServingConfig) -> int:
    """Run until SIGTERM/SIGINT in this process: one process, waitress threads, the batching
    workers inside. On the signal, new requests get 503 and in-flight ones get
    ``drain_timeout_s`` to finish. Prints one JSON line with the URL once listening."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    app = create_app(config)
    server = _waitress_server(app, config, config.port)
    state: ServingState = app.extensions["lmref"]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop_loop = threading.Event()
    thread = threading.Thread(target=_run_waitress, args=(server, stop_loop), name="waitress",
                              daemon=True)
    thread.start()
    url = f"http://{config.host}:{server.effective_port}"
    print(json.dumps({"event": "listening", "url": url, "pid": os.getpid()}), flush=True)
    while not stop.wait(0.5):
        pass
    state.begin_drain()
    drained = state.wait_idle(config.drain_timeout_s)
    state.close()
    if not drained:
        state.wait_idle(2.0)
    stop_loop.set()
    thread.join(timeout=10)
    print(json.dumps({"event": "stopped", "drained": drained}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return serve(config_from_args(build_arg_parser().parse_args(argv)))


class ServerProcess:
    """A server in a child process (``python -m lmref.serve ...``): its URL, and a clean stop."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 180.0):
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})})
        self._url: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._drain_output, daemon=True).start()
        try:
            self.url = self._url.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise TimeoutError("server did not start:\n" + "\n".join(self.output)) from None
        if self.url is None:
            raise RuntimeError("server exited:\n" + "\n".join(self.output))

    def _drain_output(self) -> None:  # keeps the pipe empty so the child never blocks on it
        for line in self.proc.stdout:
            self.output.append(line.rstrip())
            if line.startswith('{"event": "listening"'):
                self._url.put(json.loads(line)["url"])
        self._url.put(None)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "\n".join(self.output))
            try:
                conn = http.client.HTTPConnection(self.url.split("//")[1], timeout=2)
                conn.request("GET", "/ready")
                response = conn.getresponse()
                if response.status == 200:
                    return
                failed = {name: status for name, status in
                          json.loads(response.read()).get("models", {}).items()
                          if status not in ("ready", "loading")}
                if failed:
                    raise RuntimeError(f"model failed to load: {failed}")
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready:\n" + "\n".join(self.output))

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the drain, SIGKILL if it does not end; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_server(args: list[str], env: dict | None = None, module: str = __name__,
                 timeout: float = 180.0) -> ServerProcess:
    """Start ``python -m <module> <args>`` (this module's ``main`` by default; ``lmref.serve``
    is the same with course defaults) on a free port unless ``--port`` is given, wait for
    /ready, and return the handle; ``handle.stop()`` sends SIGTERM and waits."""
    if "--port" not in args:
        args = [*args, "--port", "0"]
    server = ServerProcess([sys.executable, "-m", module, *args], env, timeout)
    try:
        server.wait_ready(timeout)
    except Exception:
        server.stop()
        raise
    return server


# ----------------------------------------------------------------------------------- load generator
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def stream_completion(url: str, body: dict, api_key: str | None = None,
                      timeout: float = 300.0) -> dict:
    """One streaming /v1/completions call over http.client, timed like vLLM's benchmark:
    time to first token, time per output token after the first, end-to-end."""
    host = url.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    text, tokens = [], 0
    try:
        conn.request("POST", "/v1/completions", json.dumps(payload), headers)
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return {"ok": False, "status": response.status}
        for line in response:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                response.read()  # the end of the chunked body, so closing is not a disconnect
                break
            event = json.loads(data)
            if "error" in event:
                return {"ok": False, "status": 200, "error": event["error"]}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    first = first or time.perf_counter()
                    text.append(choice["text"])
    finally:
        conn.close()
    end = time.perf_counter()
    first = first or end
    return {"ok": True, "text": "".join(text), "tokens": tokens, "ttft": first - start,
            "e2e": end - start, "tpot": (end - first) / (tokens - 1) if tokens > 1 else 0.0}


def run_load(url: str, prompts: list[str], concurrency: int, model: str | None = None,
             max_tokens: int = 32, api_key: str | None = None, temperature: float = 0.0,
             ignore_eos: bool = True) -> dict:
    """A closed-loop load: ``concurrency`` clients send the prompts (each once) as fast as they
    are answered. Returns vLLM-benchmark-style numbers (requests/s, output tokens/s, TTFT, TPOT,
    end-to-end p50/p99 in ms)."""
    pending = collections.deque(enumerate(prompts))
    lock = threading.Lock()
    results: list[dict] = []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                _, prompt = pending.popleft()
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                    "ignore_eos": ignore_eos}
            if model:
                body["model"] = model
            try:
                result = stream_completion(url, body, api_key)
            except OSError as exc:
                result = {"ok": False, "error": str(exc)}
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    summary = {"concurrency": concurrency, "requests": len(ok), "failed": len(results) - len(ok),
               "duration_s": duration, "requests_per_s": len(ok) / duration,
               "output_tokens_per_s": sum(r["tokens"] for r in ok) / duration}
    for name in ("ttft", "tpot", "e2e"):
        values = [r[name] * 1000 for r in ok]
        summary[f"{name}_p50_ms"] = _percentile(values, 0.5)
        summary[f"{name}_p99_ms"] = _percentile(values, 0.99)
    return summary


if __name__ == "__main__":
    sys.exit(main())
