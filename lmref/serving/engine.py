"""The generation engine, with no web framework (nanochat style: the library apart from its server).

One ``Engine`` per model version: a worker thread owns model and tokenizer and runs continuous
batching over the engine's parts, each usable and tested alone:

- ``lmref.serving.request``: ``Job`` (one API call), ``Request`` (one prompt, its explicit
  ``RequestStatus``: WAITING -> PREFILLING -> DECODING -> FINISHED / FAILED / ABORTED),
  ``SamplingParams`` and a job's events (``Admitted``, ``Delta``, ``Finished``, ``Failed``);
- ``lmref.serving.scheduler``: the waiting queue and a replaceable ``AdmissionPolicy``
  (``FifoRowBudget`` within ``max_batch_size`` rows; ``admission="static"``: ``StaticBatch``);
- ``lmref.serving.batching``: the shared, left-padded KV cache rows join and leave (any model);
  for a Llama model ``slot_batch`` (a preallocated cache, a slot a row) and ``fused_llama``
  (its decode step in few, large calls; ``ModelSpec.decode_weights``: fp16 or int8 weights);
- ``lmref.serving.sampler``: every row's next token at once (per-row temperature, top-p, seed as
  tensors) and the logprobs a request asks for; ``lmref.serving.constraints``: grammar masks;
- ``lmref.serving.detokenizer``: text a token at a time, stops; ``outputs``: tokens to events;
- ``lmref.serving.penalties`` (penalties, ``logit_bias``), ``echo``, ``prompts`` (chat template,
  context limit), ``loader`` (over ``lmref.models.loading``), ``response_cache``, ``metrics``.

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

import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator

import torch

from lmref.core.threads import release_openmp_workers
from lmref.serving.batching import Prefill, PrefixCache, RunningBatch
from lmref.serving.constraints import Grammars
from lmref.serving.detokenizer import TextStream
from lmref.serving.echo import prompt_scorers, score_alone
from lmref.serving.loader import ServedModel, load_spec
from lmref.serving.metrics import EngineMetrics
from lmref.serving.outputs import OutputProcessor
from lmref.serving.penalties import adjust_of, sample
from lmref.serving.prompts import DEFAULT_CHAT_TEMPLATE, encode_prompt
from lmref.serving.request import (
    Admitted,
    Delta,
    EngineError,
    Event,
    Failed,
    Finished,
    Job,
    QueueFull,
    Request,
    RequestStatus,
    SamplingParams,
)
from lmref.serving.response_cache import ResponseCache, cache_key
from lmref.serving.sampler import GREEDY_BELOW, SamplingRows, step_logprobs
from lmref.serving.scheduler import POLICIES, AdmissionPolicy, Scheduler
from lmref.serving.slot_batch import SlotBatch
from lmref.serving.spec import ModelSpec
from lmref.serving.warm_up import warm_up

# The names the app, the production stage and the tests import from here.
__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "Admitted", "Delta", "Engine", "EngineError", "EngineMetrics",
    "Failed", "Finished", "Job", "ModelSpec", "QueueFull", "ResponseCache", "SamplingParams",
]  # fmt: skip

log = logging.getLogger("lmref.serving.engine")
Status = RequestStatus


class Engine:
    """One model version: a worker thread that owns model and tokenizer and batches requests.

    Only the worker touches the tokenizer: a fast (Rust) tokenizer used by several threads at once
    raises "Already borrowed" when one thread changes its padding/truncation state mid-call.
    """

    def __init__(
        self,
        spec: ModelSpec,
        metrics: EngineMetrics,
        cache: ResponseCache,
        policy: AdmissionPolicy | None = None,  # None: POLICIES[spec.admission](max_batch_size)
    ):
        self.spec, self.metrics, self.cache = spec, metrics, cache
        self.served: ServedModel | None = None
        self.model = self.tokenizer = None
        self.context_length = 0
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._abort_message: str | None = None
        self._labels = labels = {"model_name": spec.name}
        waiting = metrics.waiting.labels(**labels)
        self.scheduler = Scheduler(
            policy or POLICIES[spec.admission](spec.max_batch_size),
            spec.max_queue_size,
            spec.batch_wait_ms / 1000,
            on_waiting=waiting.set,
        )
        self._thread = threading.Thread(target=self._work, name=f"engine-{spec.name}", daemon=True)
        waiting.set(0)
        metrics.running.labels(**labels).set(0)

    # -- lifecycle
    def start(self) -> None:
        release_openmp_workers()  # the worker runs the model: this thread's pool would slow it
        self._thread.start()

    def _load(self) -> None:
        spec = self.spec
        self.served = load_spec(spec)  # refused (IntegrityError) unless it matches its manifest
        self.model, self.tokenizer = self.served.model, self.served.tokenizer
        self.context_length = self.served.context_length
        self.grammars = Grammars(self.tokenizer, self.served.vocab_size, self.served.eos_ids)
        self.outputs = OutputProcessor(
            self.tokenizer, self.served.eos_ids, self.metrics, spec.name, self.cache
        )
        self._reset()  # then a full batch once, before any request (lmref.serving.warm_up)
        warm_up(
            self._batch, self.model, spec.max_batch_size, spec.warm_up_tokens, self.served.pad_id
        )

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None

    @property
    def busy_rows(self) -> int:
        """Rows queued, prefilling or decoding (0: idle; read without a lock, a hint)."""
        running = len(getattr(self, "_rows", ())) + len(getattr(self, "_prefill_rows", ()))
        return self.scheduler.waiting_rows + running

    def release(self, timeout: float = 30.0) -> bool:
        """After ``close``: wait for the worker to end, then drop the model so its memory can
        be freed (lmref.serving.live unloads a version so). False: the worker still runs."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self.served = self.model = self.tokenizer = self.outputs = None
        self._batch = self._prefix = None
        return True

    def close(self, abort_message: str | None = "server is shutting down") -> None:
        """Stop the worker; queued jobs get a ``Failed`` event ("closed"), and running ones too
        unless ``abort_message`` is None (then they finish: a drain)."""
        self._abort_message = abort_message  # before closing: the worker reads both
        for job in self.scheduler.close():
            for row in job.rows:
                row.move(Status.FAILED)
            job.events.put(
                Failed(
                    EngineError("closed", abort_message or "shutting down", code="shutting_down")
                )
            )

    # -- request side
    def submit(self, job: Job) -> None:
        """Queue the job's rows; greedy rows already in the response cache finish at once."""
        for row in list(job.rows) if self.cache.size > 0 else []:
            row.cache_key = cache_key(self.spec.name, row, job.tenant)
            if row.cache_key is None:
                continue
            hit = self.cache.get(row.cache_key)
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels(
                **self._labels
            ).inc()
            if hit:
                job.rows.remove(row)
                row.move(Status.FINISHED)
                job.events.put(dataclasses.replace(hit, index=row.index, cached=True))
        if not job.rows:
            job.events.put(Admitted())
            return
        self.scheduler.submit(job)

    def cancel(self, job: Job) -> None:
        """A client went away: drop its queued rows now, running rows at the next decode step."""
        job.cancelled.set()
        log.info("request %s cancelled: its reader left before the end", job.request_id or "-")
        if dropped := self.scheduler.remove(job):
            for row in job.rows:
                row.move(Status.ABORTED)
            self.metrics.request_success.labels(finished_reason="abort", **self._labels).inc(
                dropped
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
    # Continuous batching: each turn of the loop admits what waits and fits (the scheduler), runs
    # one chunk of the new rows' prefill, and one decode step of every running row (batching holds
    # the shared cache). A prefilled row joins at the next step; a finished one leaves at once.
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
            busy = len(self._rows) + len(self._prefill_rows)
            jobs = self.scheduler.next_jobs(busy, prefilling=self._prefill is not None)
            if jobs is None:
                return
            try:
                self._start(jobs)
                self._advance()
            except Exception:
                failed = {r.job for r in self._rows + self._prefill_rows} | set(jobs)
                # Named by request id: the access log and the client's X-Request-ID find it.
                ids = ", ".join(sorted(job.request_id or "-" for job in failed))
                log.exception("generation failed (requests %s)", ids)
                for job in failed:
                    for row in job.rows:
                        if not row.status.done:
                            row.move(Status.FAILED)
                    job.events.put(
                        Failed(EngineError("internal", "generation failed", code="internal_error"))
                    )
                self._reset()

    def _reset(self) -> None:
        fused = self.served.fused  # a Llama's fused decode weights: the slot cache's fast path
        slots = self.spec.max_batch_size  # the slot cache is kept at this size while idle
        self._batch = SlotBatch(self.model, fused, slots) if fused else RunningBatch(self.model)
        self._prefix = PrefixCache(self.model, self.spec.prefix_cache_min_tokens)
        self._rows: list[Request] = []  # decoding, in the batch's row order
        self._sampling: SamplingRows | None = None  # the same rows' sampling settings
        self._prefill: Prefill | None = None
        self._prefill_rows: list[Request] = []
        self._prefill_sampling: SamplingRows | None = None
        self.metrics.running.labels(**self._labels).set(0)

    def _closing(self) -> bool:
        return self._abort_message is not None and self.scheduler.closed

    def _closing_message(self) -> str | None:
        return self._abort_message if self.scheduler.closed else None

    def _admit(self, row: Request) -> None:
        """Tokenize a row and set what generation needs: its seed, text stream, prompt scores."""
        served = self.served
        row.prompt_ids = encode_prompt(
            row, served.tokenizer, self.spec.chat_template, served.context_length, served.vocab_size
        )
        p = row.params  # read after encode_prompt: a base model's chat row got the default stop
        row.matcher = self.grammars.matcher(p.grammar)  # EngineError: a schema it cannot take
        if p.temperature >= GREEDY_BELOW:
            row.seed = (p.seed if p.seed is not None else secrets.randbits(63)) % (1 << 63)
        if p.stop or row.job.stream:
            row.text_stream = TextStream(served.tokenizer, p.stop, stream=row.job.stream)

    def _start(self, jobs: list[Job]) -> None:
        """Tokenize the jobs' rows and begin their prefill (one left-padded group)."""
        rows: list[Request] = []
        for job in jobs:
            if job.cancelled.is_set():
                for row in job.rows:
                    row.move(Status.ABORTED)
                continue
            try:
                for row in job.rows:
                    self._admit(row)
            except EngineError as err:
                for row in job.rows:
                    row.move(Status.FAILED)
                job.events.put(Failed(err))
                continue
            job.events.put(Admitted())
            rows.extend(job.rows)
        for row in rows:
            row.move(Status.PREFILLING)
            self.metrics.prompt_tokens.labels(**self._labels).inc(len(row.prompt_ids))
            if row.max_tokens == 0:  # echo, max_tokens 0: a pass to score the prompt, no prefill
                score_alone(row, self.model, self.served.pieces)
                self.outputs.finish(row, "length", time.perf_counter())
        rows = [row for row in rows if row.max_tokens > 0]
        if rows:
            self._prefill = Prefill(
                self.model,
                [r.prompt_ids for r in rows],
                self.served.pad_id,
                self.spec.prefill_chunk_tokens,
                self._prefix,
                score=prompt_scorers(rows, self.served.pieces),  # echo: from this very pass
            )
            self._prefill_rows = rows
            self._prefill_sampling = SamplingRows.of(
                [r.params.temperature for r in rows],
                [r.params.top_p for r in rows],
                [r.seed or 0 for r in rows],
                device=self.served.device,
            )
            self._prefill_sampling.adjust = adjust_of(  # penalties, logit_bias
                [r.params for r in rows], self.served.vocab_size, self.served.device
            )

    def _advance(self) -> None:
        """One chunk of the pending prefill, then one decode step of every running row."""
        if self._prefill is not None:
            logits = self._prefill.step()
            if logits is not None:  # prefill done: the new rows join with their first token
                new, base, sampling = self._prefill_rows, len(self._rows), self._prefill_sampling
                self._batch.join(self._prefill)
                self._prefill, self._prefill_rows, self._prefill_sampling = None, [], None
                self.metrics.batch_size.labels(**self._labels).observe(len(new))
                for row in new:
                    row.move(Status.DECODING)
                keep = [base + k for k in self._next_tokens(new, logits, sampling)]
                self._rows += new
                self._sampling = (
                    sampling if self._sampling is None else self._sampling.cat(sampling)
                )
                self._leave([*range(base), *keep])
        if self._rows:
            logits = self._batch.step([row.pending for row in self._rows])
            self._leave(self._next_tokens(self._rows, logits, self._sampling))
        self.metrics.running.labels(**self._labels).set(len(self._rows) + len(self._prefill_rows))

    def _leave(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        order = self._batch.leave(keep)  # the kept rows' new order (SlotBatch moves some)
        self._rows = [self._rows[k] for k in order]
        self._sampling = self._sampling.select(order) if order else None

    def _next_tokens(
        self, rows: list[Request], logits: torch.Tensor, sampling: SamplingRows
    ) -> list[int]:
        """Sample each row's next token and append it; the indices of rows still running.
        A hand-written loop instead of model.generate(): generate() applies ONE temperature/
        top_p/seed/stop/max_new_tokens to the whole batch, a server's requests each bring theirs."""
        tokens = sample(self.grammars.mask(rows, logits), sampling).tolist()  # one device read
        self.grammars.accept(rows, tokens)
        # Reported logprobs: log-softmax of the raw logits, before temperature and top-p, as
        # OpenAI's API reports them (lmref.serving.sampler says why).
        want = [k for k, row in enumerate(rows) if row.params.logprobs is not None]
        entries = {}
        if want:
            found = step_logprobs(
                logits[want],
                [tokens[k] for k in want],
                [rows[k].params.logprobs for k in want],
                self.served.pieces,
            )
            entries = dict(zip(want, found))
        now = time.perf_counter()
        keep = []
        for k, (row, token) in enumerate(zip(rows, tokens)):
            if row.job.cancelled.is_set() or self._closing():
                self.outputs.finish(row, "abort", now, closing=self._closing_message())
            elif not self.outputs.append(row, token, now, entries.get(k)):
                row.pending = token
                keep.append(k)
        return keep
