"""The generation engine, with no web framework: request queue, batching, KV cache, sampling, stops.

One ``Engine`` per model version: a worker thread owns model and tokenizer and batches queued
``Job``s (one per request, a ``Row`` per prompt) continuously: a new row joins the running batch
at the next decode step, a finished one leaves at once (``lmref.serving.batching``: the shared KV cache).
Each row is sampled with its own temperature/top-p/seed (``lmref.serving.sampler``, which also computes
the logprobs a request asks for) and ends on EOS, a stop string or ``max_tokens``. Results come
back as named events (``Admitted``, ``Delta``, ``Finished``, ``Failed``). Device and dtype come
from ``lmref.core.device`` (the project's one policy); on CPU, linear weights are packed for oneDNN
(``lmref.serving.packed_linear``). Metrics: ``lmref.serving.metrics``; the Flask app: ``lmref.serving.app``.

Usage::

    from lmref.serving.engine import Engine, EngineMetrics, Job, ModelSpec, ResponseCache, SamplingParams

    engine = Engine(ModelSpec("base", "artifacts/base"), EngineMetrics(), ResponseCache(0))
    engine.start(); engine.loaded.wait()
    job = Job("base", stream=False)
    job.add_row("def add(", SamplingParams(max_tokens=16, temperature=0))
    engine.submit(job)
    print(engine.results(job)[0].text)       # list[Finished]; stream: engine.events(job)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lmref.serving.batching import Prefill, PrefixCache, RunningBatch
from lmref.serving.packed_linear import pack_linears
from lmref.core.device import PRECISIONS, compute_dtype, resolve_device
from lmref.serving.sampler import TokenLogprob, TokenPieces, reported, sample, score_prompt, step_logprobs
from lmref.serving.metrics import EngineMetrics

log = logging.getLogger("lmref.serving.engine")

# Used when the tokenizer brings no chat template (a base model): plain role markers, and the
# next "<|user|>" marker is treated as a stop so a base model does not write the user's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_CHAT_STOP = ("<|user|>",)
_LOAD_LOCK = threading.Lock()


@dataclass
class ModelSpec:
    """One served model version: a name clients use and a Hugging Face folder (safetensors)."""

    name: str
    path: str
    max_batch_size: int = 16  # rows (prompts) decoding together; 1 turns batching off
    batch_wait_ms: float = 5.0  # how long an idle worker gathers requests (a busy one: none)
    prefill_chunk_tokens: int = 256  # prompt columns per prefill forward; decode steps between
    prefix_cache_min_tokens: int = 16  # a shared prompt start this long is computed once; 0: off
    max_queue_size: int = 256  # rows waiting; more -> QueueFull (the app answers 429)
    device: str = "auto"  # cuda when present, else cpu
    chat_template: str | None = None  # Jinja; None: the tokenizer's, else DEFAULT_CHAT_TEMPLATE
    dtype: str = "auto"  # bf16 on GPUs that have it, fp32 on CPU; or fp32/bf16/fp16
    pack_linears: bool = True  # CPU: weights packed once for oneDNN (lmref.serving.packed_linear)


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: until EOS or the context length
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: not reported; k: each token's + its k likeliest rivals
    echo: bool = False  # also the prompt: its text, and with logprobs its tokens'


class EngineError(Exception):
    """A request the engine could not serve. ``kind``: "invalid" (the request's fault),
    "closed" (shutting down) or "internal"; ``param`` names the request field at fault."""

    def __init__(self, kind: str, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.param, self.code = kind, message, param, code


class QueueFull(Exception):
    """More rows waiting than ``ModelSpec.max_queue_size``."""


# A job's events, in order: Admitted (or Failed), Delta* (streaming only), one Finished per row.
@dataclass(frozen=True)
class Admitted:  # the prompts were tokenized and fit the context: generation starts
    pass


@dataclass(frozen=True)
class Delta:  # new text of one row: never half a character nor a possible stop string's start
    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # tokens that text starts in (when asked)


@dataclass(frozen=True)
class Finished:  # one row is done; reason: "stop" (EOS, a stop string) or "length"
    index: int
    text: str
    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False  # answered from the response cache, no Delta came before
    logprobs: tuple[TokenLogprob, ...] | None = None  # completion tokens, EOS included
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # echo, first: no logprob
    prompt_text: str = ""  # echo: the prompt as text


@dataclass(frozen=True)
class Failed:  # the whole job failed: its rows end here
    error: EngineError


Event = Admitted | Delta | Finished | Failed


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


class Row:
    """One prompt being generated: its state lives in the worker thread only."""

    def __init__(
        self, job: Job, index: int, prompt: str | list, params: SamplingParams, is_chat: bool
    ):
        self.job, self.index, self.prompt, self.params = job, index, prompt, params
        self.is_chat, self.cache_key = is_chat, None
        self.prompt_ids: list[int] = []
        self.out_ids: list[int] = []
        self.max_tokens = self.completion_tokens = 0  # max: params', or what the context leaves
        self.emitted = self.search_from = 0  # characters sent to a stream; stop search start
        self.text, self.last_token_at = "", 0.0
        self.generator: torch.Generator | None = None
        self.pending = 0  # sampled, not yet fed to the model (a running row)
        self.logprobs: list[TokenLogprob] = []
        self.starts: list[int] = []  # where each reported token's text starts (stop cuts)
        self.settled = self.logprobs_sent = 0
        self.prompt_logprobs: list | None = None


class Job:
    """One HTTP request: its rows are batched together; events flow back on ``events``."""

    def __init__(self, model_name: str, stream: bool):
        self.model_name, self.stream = model_name, stream
        self.rows: list[Row] = []
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.arrival = time.perf_counter()
        self.rows_total = 0  # rows including those answered from the cache

    def add_row(self, prompt: str | list, params: SamplingParams, is_chat: bool = False) -> Row:
        row = Row(self, self.rows_total, prompt, params, is_chat)
        self.rows.append(row)
        self.rows_total += 1
        return row


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class Engine:
    """One model version: a worker thread that owns model and tokenizer and batches requests.

    Only the worker touches the tokenizer: a fast (Rust) tokenizer used by several threads at once
    raises "Already borrowed" when one thread changes its padding/truncation state mid-call.
    """

    def __init__(self, spec: ModelSpec, metrics: EngineMetrics, cache: ResponseCache):
        self.spec, self.metrics, self.cache = spec, metrics, cache
        self.model = self.tokenizer = None
        self.context_length = 0
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._waiting_rows = 0
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
        dtype = (
            compute_dtype(device, self.spec.dtype)
            if self.spec.dtype in {"auto", *PRECISIONS}
            else self.spec.dtype
        )  # a torch dtype's name, e.g. "bfloat16"
        # Weights from safetensors only: a pickled pytorch_model.bin can run code when loaded.
        # One load at a time: from_pretrained switches process-wide init state (meta device),
        # so two threads loading at once corrupt each other's model.
        # transformers' lazy imports are not thread-safe either.
        with _LOAD_LOCK:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(
                self.spec.path, dtype=dtype, use_safetensors=True
            )
            self.model = model.to(device).eval()
            if self.spec.pack_linears and not getattr(model, "peft_config", None):  # unmerged
                pack_linears(self.model)
            self.tokenizer = AutoTokenizer.from_pretrained(self.spec.path)
        cfg = model.config.get_text_config(decoder=True)
        self.context_length = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
        )
        eos = (
            self.tokenizer.eos_token_id
            if self.tokenizer.eos_token_id is not None
            else model.config.eos_token_id
        )
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (next(iter(self.eos_ids), 0))
        self.device = device
        self._pieces = TokenPieces(self.tokenizer)

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None

    def close(self, abort_message: str | None = "server is shutting down") -> None:
        """Stop the worker; queued and running jobs get a ``Failed`` event ("closed")."""
        with self._cond:
            self._closed = True
            self._abort_message = abort_message
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._waiting_rows = 0
            self._cond.notify_all()
        for job in waiting:
            job.events.put(
                Failed(
                    EngineError("closed", abort_message or "shutting down", code="shutting_down")
                )
            )
        self.metrics.waiting.labels(**self._labels).set(0)

    # -- request side
    def submit(self, job: Job) -> None:
        """Queue the job's rows; greedy rows already in the response cache finish at once."""
        for row in [r for r in job.rows if r.params.temperature == 0 and self.cache.size > 0]:
            p = row.params
            row.cache_key = (
                self.spec.name,
                row.is_chat,
                repr(row.prompt),
                p.max_tokens,
                p.stop,
                p.ignore_eos,
                p.logprobs,
                p.echo,
            )
            hit = self.cache.get(row.cache_key)
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels(
                **self._labels
            ).inc()
            if hit:
                job.rows.remove(row)
                job.events.put(dataclasses.replace(hit, index=row.index, cached=True))
        if not job.rows:
            job.events.put(Admitted())
            return
        rows = len(job.rows)
        with self._cond:
            if self._closed:
                raise EngineError("closed", "server is shutting down", code="shutting_down")
            if self._waiting_rows + rows > self.spec.max_queue_size:
                raise QueueFull()
            self._waiting.append(job)
            self._waiting_rows += rows
            self.metrics.waiting.labels(**self._labels).set(self._waiting_rows)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """A client went away: drop its queued rows now, running rows at the next decode step."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._waiting_rows -= len(job.rows)
                self.metrics.waiting.labels(**self._labels).set(self._waiting_rows)
                self.metrics.request_success.labels(finished_reason="abort", **self._labels).inc(
                    len(job.rows)
                )

    def events(self, job: Job, disconnected: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        """The job's events until all rows finished; cancels it if the reader goes away."""
        finished = 0
        try:
            while finished < job.rows_total:
                try:
                    event = job.events.get(timeout=0.25)
                except queue.Empty:
                    event = None
                if disconnected():
                    return
                if event is not None:
                    finished += isinstance(event, Finished)
                    yield event
        finally:
            if finished < job.rows_total:
                self.cancel(job)

    def results(
        self, job: Job, disconnected: Callable[[], bool] = lambda: False
    ) -> list[Finished] | None:
        """Every row's ``Finished`` in order; None when the client went away; a ``Failed``
        event is raised as its EngineError."""
        done: dict[int, Finished] = {}
        for event in self.events(job, disconnected):
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                done[event.index] = event
        return [done[i] for i in range(job.rows_total)] if len(done) == job.rows_total else None

    # -- worker side
    # Continuous batching: each turn of the loop admits what waits and fits, runs one chunk of the
    # new rows' prefill, and one decode step of every running row (lmref.serving.batching holds the
    # shared cache). A prefilled row joins at the next step; a finished one leaves at once.
    def _work(self) -> None:
        try:
            self._load()
        except Exception as exc:  # a broken folder must not kill the process: /ready reports it
            log.exception("loading %s failed", self.spec.path)
            self.load_error = f"{type(exc).__name__}: {exc}"
        self.loaded.set()
        if self.load_error:
            return
        self._reset()
        while True:
            jobs = self._admit()
            if jobs is None:
                return
            try:
                self._start(jobs)
                self._advance()
            except Exception:
                log.exception("generation failed")
                for job in {r.job for r in self._rows + self._prefill_rows} | set(jobs):
                    job.events.put(
                        Failed(EngineError("internal", "generation failed", code="internal_error"))
                    )
                self._reset()

    def _reset(self) -> None:
        self._batch = RunningBatch(self.model)
        self._prefix = PrefixCache(self.model, self.spec.prefix_cache_min_tokens)
        self._rows: list[Row] = []  # decoding, in the batch's row order
        self._prefill: Prefill | None = None
        self._prefill_rows: list[Row] = []
        self.metrics.running.labels(**self._labels).set(0)

    def _admit(self) -> list[Job] | None:
        """Jobs to start now: those waiting that fit beside the running rows. An idle worker
        gathers for batch_wait_ms first; None: closed and nothing left to run."""
        spec = self.spec
        busy = len(self._rows) + len(self._prefill_rows)
        with self._cond:
            while not self._waiting and not busy and not self._closed:
                self._cond.wait()
            if self._closed:
                return [] if busy else None
            if self._prefill is not None or not self._waiting:
                return []  # newcomers make the next prefill group
            if not busy:  # a burst of requests is prefilled together
                deadline = self._waiting[0].arrival + spec.batch_wait_ms / 1000
                while self._waiting_rows < spec.max_batch_size and not self._closed:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            jobs, rows = [], busy
            while self._waiting and (
                not rows or rows + len(self._waiting[0].rows) <= spec.max_batch_size
            ):
                job = self._waiting.popleft()
                jobs.append(job)
                rows += len(job.rows)
            self._waiting_rows -= rows - busy
            self.metrics.waiting.labels(**self._labels).set(self._waiting_rows)
            return jobs

    def _encode(self, row: Row) -> list[int]:
        tok = self.tokenizer
        if row.is_chat:
            template = self.spec.chat_template or tok.chat_template or DEFAULT_CHAT_TEMPLATE
            if self.spec.chat_template is None and tok.chat_template is None:  # a base model
                row.params = dataclasses.replace(
                    row.params, stop=row.params.stop + DEFAULT_CHAT_STOP
                )
            try:
                text = tok.apply_chat_template(
                    row.prompt, chat_template=template, tokenize=False, add_generation_prompt=True
                )
            except Exception as exc:  # a template's raise_exception(), or one that breaks on
                # these messages: this request's fault, not the batch's (jinja2's errors vary)
                raise EngineError(
                    "invalid",
                    f"the chat template failed on these messages: {exc}",
                    param="messages",
                    code="chat_template_error",
                ) from None
            ids = tok(text, add_special_tokens=tok.chat_template is None)["input_ids"]
        elif isinstance(row.prompt, list):  # token ids, as lm-evaluation-harness sends them
            ids, vocab = list(row.prompt), self.model.get_input_embeddings().num_embeddings
            if any(i >= vocab for i in ids):
                raise EngineError(
                    "invalid",
                    f"prompt token ids must be below {vocab}, the model's vocabulary size",
                    param="prompt",
                    code="invalid_token",
                )
        else:
            ids = tok(row.prompt)["input_ids"]
        if not ids:
            if tok.bos_token_id is None:
                raise EngineError("invalid", "prompt is empty", param="prompt", code="empty_prompt")
            ids = [tok.bos_token_id]
        limit, wanted = self.context_length, row.params.max_tokens
        if len(ids) + (1 if wanted is None else wanted) > limit:
            raise EngineError(
                "invalid",
                f"This model's maximum context length is {limit} tokens; "
                f"the prompt has {len(ids)} and max_tokens is {wanted or 'unset'}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        row.max_tokens = limit - len(ids) if wanted is None else wanted  # 0: echo, score only
        return ids

    def _start(self, jobs: list[Job]) -> None:
        """Tokenize the jobs' rows and begin their prefill (one left-padded group)."""
        rows: list[Row] = []
        for job in jobs:
            if job.cancelled.is_set():
                continue
            try:
                for row in job.rows:
                    row.prompt_ids = self._encode(row)
            except EngineError as err:
                job.events.put(Failed(err))
                continue
            job.events.put(Admitted())
            rows.extend(job.rows)
        labels = self._labels
        for row in rows:
            self.metrics.prompt_tokens.labels(**labels).inc(len(row.prompt_ids))
            if row.params.temperature >= 1e-5:
                row.generator = torch.Generator(device=self.device)
                seed = row.params.seed if row.params.seed is not None else secrets.randbits(63)
                row.generator.manual_seed(seed % (1 << 63))
            if row.params.echo and row.params.logprobs is not None:
                row.prompt_logprobs = score_prompt(
                    self.model, row.prompt_ids, row.params.logprobs, self._pieces
                )
            if row.max_tokens == 0:  # echo with max_tokens 0: the prompt scored, nothing generated
                self._finish(row, "length", time.perf_counter())
        rows = [row for row in rows if row.max_tokens > 0]
        if rows:
            self._prefill = Prefill(
                self.model,
                [r.prompt_ids for r in rows],
                self.pad_id,
                self.spec.prefill_chunk_tokens,
                self._prefix,
            )
            self._prefill_rows = rows

    def _advance(self) -> None:
        """One chunk of the pending prefill, then one decode step of every running row."""
        if self._prefill is not None:
            logits = self._prefill.step()
            if logits is not None:  # prefill done: the new rows join with their first token
                new, base = self._prefill_rows, len(self._rows)
                self._batch.join(self._prefill)
                self._prefill, self._prefill_rows = None, []
                self.metrics.batch_size.labels(**self._labels).observe(len(new))
                keep = [base + k for k in self._next_tokens(new, logits)]
                self._rows += new
                self._leave([*range(base), *keep])
        if self._rows:
            logits = self._batch.step([row.pending for row in self._rows])
            self._leave(self._next_tokens(self._rows, logits))
        self.metrics.running.labels(**self._labels).set(len(self._rows) + len(self._prefill_rows))

    def _leave(self, keep: list[int]) -> None:
        self._batch.leave(keep)
        self._rows = [self._rows[k] for k in keep]

    def _next_tokens(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Sample each row's next token and append it; the indices of rows still running.
        A hand-written loop instead of model.generate(): generate() applies ONE temperature/
        top_p/seed/stop/max_new_tokens to the whole batch, a server's requests each bring theirs."""
        tokens = sample(
            logits,
            [r.params.temperature for r in rows],
            [r.params.top_p for r in rows],
            [r.generator for r in rows],
        )
        # Reported logprobs: log-softmax of the raw logits, before temperature and top-p, as
        # OpenAI's API reports them (lmref.serving.sampler says why).
        want = [k for k, row in enumerate(rows) if row.params.logprobs is not None]
        entries = (
            dict(
                zip(
                    want,
                    step_logprobs(
                        logits[want],
                        [tokens[k] for k in want],
                        [rows[k].params.logprobs for k in want],
                        self._pieces,
                    ),
                )
            )
            if want
            else {}
        )
        now = time.perf_counter()
        keep = []
        for k, (row, token) in enumerate(zip(rows, tokens)):
            if row.job.cancelled.is_set() or self._abort_message is not None and self._closed:
                self._finish(row, "abort", now)
            elif not self._append(row, token, now, entries.get(k)):
                row.pending = token
                keep.append(k)
        return keep

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _append(self, row: Row, token: int, now: float, entry: TokenLogprob | None = None) -> bool:
        """Add one token to a row; returns True when the row is finished."""
        if entry is not None:
            row.logprobs.append(entry)
            row.starts.append(row.settled)
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
            # A character split over tokens decodes as U+FFFD until its last byte comes: only
            # the text before it is final, so searches restart from there (else a stop string
            # ending in such a character is skipped over).
            settled = row.settled = len(text.rstrip("\ufffd"))
            if stops:
                hits = [i for i in (text.find(s, row.search_from) for s in stops) if i >= 0]
                if hits:
                    row.text = text[: min(hits)]
                    self._finish(row, "stop", now, decoded=True)
                    return True
                row.search_from = max(0, settled - max(map(len, stops)) + 1)
            if row.job.stream:
                safe = settled - held_back(text[:settled], stops)  # a possible stop start waits
                if safe > row.emitted:
                    sent = row.logprobs_sent
                    row.logprobs_sent = reported(row.starts, safe)
                    row.job.events.put(
                        Delta(
                            row.index,
                            text[row.emitted : safe],
                            tuple(row.logprobs[sent : row.logprobs_sent]),
                        )
                    )
                    row.emitted = safe
        if row.completion_tokens >= row.max_tokens:
            self._finish(row, "length", now)
            return True
        return False

    def _finish(self, row: Row, reason: str, now: float, decoded: bool = False) -> None:
        labels = self._labels
        if not decoded:
            row.text = self._decode_text(row.out_ids)
        else:  # a stop string cut the text: tokens starting after the cut are not the answer's
            del row.logprobs[reported(row.starts, len(row.text)) :]
        if reason == "abort":
            self.metrics.request_success.labels(finished_reason="abort", **labels).inc()
            if self._closed and self._abort_message and not row.job.cancelled.is_set():
                row.job.events.put(
                    Failed(EngineError("closed", self._abort_message, code="shutting_down"))
                )
            return
        if row.job.stream and (
            len(row.text) > row.emitted or len(row.logprobs) > row.logprobs_sent
        ):
            row.job.events.put(
                Delta(row.index, row.text[row.emitted :], tuple(row.logprobs[row.logprobs_sent :]))
            )
            row.emitted, row.logprobs_sent = len(row.text), len(row.logprobs)
        self.metrics.request_success.labels(finished_reason=reason, **labels).inc()
        self.metrics.e2e_latency.labels(**labels).observe(now - row.job.arrival)
        p, prompt = row.params, row.prompt
        result = Finished(
            row.index,
            row.text,
            reason,
            len(row.prompt_ids),
            row.completion_tokens,
            logprobs=None if p.logprobs is None else tuple(row.logprobs),
            prompt_logprobs=None if row.prompt_logprobs is None else tuple(row.prompt_logprobs),
            prompt_text=(
                prompt
                if isinstance(prompt, str)
                else self.tokenizer.decode(row.prompt_ids, clean_up_tokenization_spaces=False)
            )
            if p.echo
            else "",
        )
        if row.cache_key is not None:
            self.cache.put(row.cache_key, result)
        row.job.events.put(result)
