"""What a request is inside the engine: its sampling settings, its explicit state, its events.

A ``Job`` is one API call; each prompt (times ``n``) in it is a ``Request`` whose ``status``
walks ``WAITING -> PREFILLING -> DECODING -> FINISHED`` (or ``FAILED`` / ``ABORTED``), the way
transformers' continuous batching tracks a ``RequestState`` with a ``RequestStatus``. Only the
engine's worker thread changes a request after it is submitted; what a client sees are the
job's events, in order: ``Admitted`` (or ``Failed``), ``Delta``* (streaming only), one
``Finished`` per request. Needs nothing but the standard library (and the logprob entries of
``lmref.serving.sampler``).

Usage::

    from lmref.serving.request import Job, RequestStatus, SamplingParams

    job = Job("base", stream=False)
    request = job.add_row("def add(", SamplingParams(max_tokens=16, temperature=0))
    assert request.status is RequestStatus.WAITING and request.index == 0
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmref.serving.sampler import TokenLogprob

if TYPE_CHECKING:
    from lmref.serving.constraints import Grammar
    from lmref.serving.detokenizer import TextStream
    from lmref.serving.tool_calls import ToolSet


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
    presence_penalty: float = 0.0  # -2..2, lmref.serving.penalties applies these three
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100), sorted by id
    grammar: Grammar | None = None  # response_format: what the output must match (constraints)
    tools: ToolSet | None = None  # tools the prompt shows and the output is parsed for


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


class RequestStatus(enum.Enum):
    """Where a request is; the worker moves it forward, never back."""

    WAITING = "waiting"  # queued in the scheduler
    PREFILLING = "prefilling"  # tokenized; its prompt runs through the model in chunks
    DECODING = "decoding"  # in the running batch, one token a step
    FINISHED = "finished"  # ended on EOS, a stop string or its token limit: Finished sent
    FAILED = "failed"  # its job failed (bad prompt, engine error): Failed sent
    ABORTED = "aborted"  # its client went away, or the engine closed mid-generation

    @property
    def done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.ABORTED)


@dataclass(eq=False)  # identity, not field equality: the engine keeps requests in lists
class Request:
    """One prompt being generated: what was asked, where it is, and what it has produced."""

    job: Job
    index: int  # its choice index in the job's response
    prompt: str | list  # text, chat messages (is_chat) or token ids
    params: SamplingParams
    is_chat: bool = False
    status: RequestStatus = RequestStatus.WAITING
    cache_key: tuple | None = None  # set when a greedy result may be stored in the cache
    # Set when admitted (the worker tokenizes the prompt).
    prompt_ids: list[int] = field(default_factory=list)
    max_tokens: int = 0  # params.max_tokens, or what the context leaves; 0: echo, score only
    seed: int | None = None  # the sampling seed (a random one when params.seed is None)
    prompt_logprobs: list[TokenLogprob] | None = None  # echo + logprobs
    # Generation.
    out_ids: list[int] = field(default_factory=list)  # completion tokens, EOS excluded
    completion_tokens: int = 0  # tokens sampled, EOS included
    pending: int = 0  # the last token sampled, fed to the model at the next decode step
    last_token_at: float = 0.0
    text_stream: TextStream | None = None  # incremental text: streaming rows, stop strings
    logprobs: list[TokenLogprob] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # where each token's text starts (stops)
    emitted: int = 0  # characters sent to the stream
    logprobs_sent: int = 0  # logprob entries sent to the stream
    text: str = ""  # the final text, once finished
    matcher: Any = None  # the grammar's state for a constrained row (lmref.serving.constraints)

    def move(self, status: RequestStatus) -> None:
        """Change state; a finished, failed or aborted request stays so (an error, not a no-op)."""
        if self.status.done:
            raise RuntimeError(f"request {self.index} is already {self.status.value}")
        self.status = status


class Job:
    """One API call: its requests are batched together; events flow back on ``events``."""

    def __init__(
        self, model_name: str, stream: bool, tenant: str | None = None, request_id: str = ""
    ):
        self.model_name, self.stream = model_name, stream
        self.tenant = tenant  # whose cached answers it may reuse (None: the shared entries)
        self.request_id = request_id  # the caller's X-Request-ID: the engine's log lines name it
        self.rows: list[Request] = []  # those still to generate (cache hits are removed)
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.arrival = time.perf_counter()
        self.rows_total = 0  # rows including those answered from the cache

    def add_row(self, prompt: str | list, params: SamplingParams, is_chat: bool = False) -> Request:
        row = Request(self, self.rows_total, prompt, params, is_chat)
        self.rows.append(row)
        self.rows_total += 1
        return row
