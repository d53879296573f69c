"""OpenAI requests into engine jobs, engine results into OpenAI responses: plain functions, no HTTP.

- **Request shaping**: ``shape_request(body, config, chat)`` checks a chat or completions body
  (``lmref.serving.schema``) into a ``ShapedRequest`` (prompts, ``SamplingParams``, ``n``, stream
  flags); ``build_job`` turns it into the engine's ``Job`` (``n`` rows a prompt, seeded rows each
  with their own seed).
- **Logprob shaping**: ``LogprobShaper`` writes the engine's ``TokenLogprob`` entries in chat's or
  the legacy completions shape, carrying ``text_offset`` across a stream's chunks.
- **Response bodies**: ``completion_body`` (a whole response), ``predict_body``, ``usage_of``.
- **Server-sent events**: ``ResponseShape.chunk`` builds one stream chunk, ``sse`` frames it, and
  ``sse_stream`` turns a job's events into the text a client reads, ``data: [DONE]`` last.

The Flask routes (``lmref.serving.routes_completions``) and the Batch worker
(``lmref.production.worker``, through ``lmref.serving.service``) both use these.

Usage::

    from lmref.serving.shaping import ResponseShape, build_job, completion_body, shape_request

    shaped = shape_request({"prompt": "def f(", "max_tokens": 8, "logprobs": 2}, config, chat=False)
    job = build_job(shaped, "base")                 # engine.submit(job); engine.results(job)
    shape = ResponseShape.new(chat=False, model="base", logprobs=shaped.params.logprobs)
    body = completion_body(shape, finished, usage_of(finished))     # the JSON response
    text = "".join(sse_stream(job, [], engine.events(job), shape))   # or stream it
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmref.serving.constraints import response_format
from lmref.serving.engine import Delta, EngineError, Failed, Finished, Job, SamplingParams
from lmref.serving.schema import (
    APIError,
    bad,
    chat_logprobs,
    chat_messages,
    completion_logprobs,
    completion_prompts,
    sampling_fields,
    stream_flags,
)
from lmref.serving.tool_calls import ToolSet, ToolStream, parse, tool_grammar, tool_set

log = logging.getLogger("lmref.serving.shaping")


# ----------------------------------------------------------------------------- request shaping
@dataclass(frozen=True)
class ShapedRequest:
    """A checked chat or completions request: what the engine needs, nothing HTTP."""

    prompts: list  # completions: strings or token-id lists; chat: one list of messages
    params: SamplingParams
    n: int  # choices per prompt
    chat: bool
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def shape_request(body: dict, config: Any, chat: bool) -> ShapedRequest:
    """Check an OpenAI request body; an ``APIError`` (a 400 naming the field) if it is wrong.
    ``config``: a ``ServingConfig`` (token limits and stop-string count)."""
    fields, n = sampling_fields(body, config, chat)
    tools = tool_set(body) if chat else None
    grammar, forced = response_format(body), tool_grammar(tools)
    if grammar is not None and forced is not None:  # one grammar a row
        raise bad(
            "'response_format' cannot be used with tool_choice 'required' or a named function",
            "response_format",
        )
    params = SamplingParams(**fields, grammar=grammar or forced, tools=tools)
    if params.grammar is not None and params.ignore_eos:  # the grammar's end is an EOS
        raise APIError(
            400,
            "'ignore_eos' cannot be used with 'response_format' or a forced tool_choice",
            param="ignore_eos",
        )
    stream, include_usage = stream_flags(body)
    prompts: list = [chat_messages(body)] if chat else completion_prompts(body)
    return ShapedRequest(prompts, params, n, chat, stream, include_usage)


def build_job(
    request: ShapedRequest, model_name: str, tenant: str | None = None, request_id: str = ""
) -> Job:
    """The engine job: ``n`` rows per prompt, in order; with a seed, choice k gets seed + k (the
    same request gives the same choices, and they differ from each other). ``tenant``: whose
    cached answers it may reuse; ``request_id``: the caller's, a plain value that the engine's
    log lines about this job name."""
    job = Job(model_name, request.stream, tenant, request_id)
    params = request.params
    for prompt in request.prompts:
        for k in range(request.n):
            seeded = (
                params
                if params.seed is None or k == 0
                else dataclasses.replace(params, seed=params.seed + k)
            )
            job.add_row(prompt, seeded, request.chat)
    return job


def api_error_of(err: EngineError) -> APIError:
    """The engine's error as the client sees it: invalid 400, closed 503, anything else 500."""
    status, type_ = {
        "invalid": (400, "invalid_request_error"),
        "closed": (503, "service_unavailable_error"),
    }.get(err.kind, (500, "server_error"))
    return APIError(status, err.message, type_, param=err.param, code=err.code)


# ----------------------------------------------------------------------------- response shaping
class LogprobShaper:
    """One response's logprobs, in chat's shape or the legacy completions shape; the legacy
    ``text_offset`` of each choice runs on from chunk to chunk of a stream."""

    def __init__(self, chat: bool, wanted: int | None):
        self.chat, self.wanted = chat, wanted  # wanted: SamplingParams.logprobs (None: none)
        self.offsets: dict[int, int] = collections.defaultdict(int)  # next token's text_offset

    def __call__(self, index: int, entries: Iterable) -> dict | None:
        if self.wanted is None:
            return None
        if self.chat:
            return chat_logprobs(entries)
        entries = list(entries)
        out = completion_logprobs(entries, self.offsets[index])
        self.offsets[index] += sum(len(e.token) for e in entries)
        return out


@dataclass
class ResponseShape:
    """What every part of one response shares: id, creation time, model, kind and logprobs."""

    rid: str
    created: int
    model: str
    chat: bool
    logprobs: LogprobShaper
    include_usage: bool = False
    tools: ToolSet | None = None  # chat with tools: choices' text is parsed for calls
    object_kind: str = field(init=False)
    streams: dict[int, ToolStream] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.object_kind = "chat.completion" if self.chat else "text_completion"

    @classmethod
    def new(
        cls,
        chat: bool,
        model: str,
        logprobs: int | None,
        include_usage: bool = False,
        tools: ToolSet | None = None,
    ) -> ResponseShape:
        """A fresh id (``chatcmpl-...`` or ``cmpl-...``) and the current time."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        shaper = LogprobShaper(chat, logprobs)
        return cls(rid, int(time.time()), model, chat, shaper, include_usage, tools)

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        *,
        role: bool = False,
        logprobs: tuple = (),
        calls: list | None = None,
    ) -> dict:
        """One stream chunk: chat's first has the role, later ones a ``delta``; ``text`` None
        is the chunk that only says why a choice finished; ``calls``: a ``tool_calls`` delta."""
        if self.chat:
            delta = (
                {"role": "assistant", "content": ""}
                if role
                else {"content": text}
                if text is not None
                else {}
            )
            if calls is not None:
                delta = {"tool_calls": calls}
            content: dict = {"delta": delta}
        else:
            content = {"text": text or ""}
        payload = {
            "id": self.rid,
            "object": self.chunk_kind,
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": index,
                    **content,
                    "logprobs": self.logprobs(index, logprobs)
                    if text is not None or (calls is not None and logprobs)
                    else None,
                    "finish_reason": finish,
                }
            ],
        }
        return {**payload, "usage": None} if self.include_usage else payload

    def usage_chunk(self, usage: dict) -> dict:
        """The last chunk of a stream with ``include_usage``: no choices, the token counts."""
        return {
            "id": self.rid,
            "object": self.chunk_kind,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }

    def text_chunks(self, event: Delta) -> list[dict]:
        """A stream's ``Delta`` as chunks: its text, less what may be a tool call's start, and
        the ``tool_calls`` deltas of a call being generated."""
        if self.tools is None:
            return [self.chunk(event.index, event.text, None, logprobs=event.logprobs)]
        stream = self.streams.setdefault(event.index, ToolStream(self.tools))
        text, calls = stream.push(event.text)
        # held text keeps its logprobs for the chunk that sends it (content or the calls)
        stream.entries += event.logprobs
        return self._tool_chunks(event.index, stream, text, calls)

    def _tool_chunks(self, index: int, stream: ToolStream, text: str, calls: list) -> list[dict]:
        out = []
        if text:
            out.append(self.chunk(index, text, None, logprobs=stream.entries))
            stream.entries = ()
        for delta in calls:
            out.append(self.chunk(index, None, None, calls=delta, logprobs=stream.entries))
            stream.entries = ()
        return out

    def finish_chunks(self, event: Finished, entries: tuple = ()) -> list[dict]:
        """A stream's ``Finished`` as chunks: content still held, the calls' deltas still owed,
        the reason. ``entries``: logprobs no chunk carried yet (a cached answer's)."""
        out = []
        reason = event.reason
        if self.tools is not None:
            stream = self.streams.pop(event.index, None) or ToolStream(self.tools)
            owed, calls, called = stream.finish(event.text)
            stream.entries += tuple(entries)
            out = self._tool_chunks(event.index, stream, owed, calls)
            reason = "tool_calls" if called and reason == "stop" else reason
        return out + [self.chunk(event.index, None, reason)]


def usage_of(finished: Iterable[Finished]) -> dict:
    """OpenAI's ``usage``: prompt, completion and total tokens over every choice."""
    finished = list(finished)
    usage = {
        "prompt_tokens": sum(c.prompt_tokens for c in finished),
        "completion_tokens": sum(c.completion_tokens for c in finished),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def completion_body(shape: ResponseShape, choices: list[Finished], usage: dict) -> dict:
    """A whole (not streamed) chat or completions response."""
    out = []
    for c in choices:
        reason, body = c.reason, {"text": c.prompt_text + c.text}
        if shape.chat:
            content, calls = parse(c.text, shape.tools)
            body = {"message": {"role": "assistant", "content": content}}
            if calls:
                body["message"]["tool_calls"] = calls
                reason = "tool_calls" if reason == "stop" else reason
        entries = (c.prompt_logprobs or ()) + (c.logprobs or ())
        out.append(
            {
                "index": c.index,
                **body,
                "logprobs": shape.logprobs(c.index, entries),
                "finish_reason": reason,
            }
        )
    return {
        "id": shape.rid,
        "object": shape.object_kind,
        "created": shape.created,
        "model": shape.model,
        "choices": out,
        "usage": usage,
    }


def predict_body(model: str, choices: list[Finished], usage: dict) -> dict:
    """``POST /predict``'s answer: the first choice's text and why it ended."""
    return {
        "model": model,
        "completion": choices[0].text,
        "finish_reason": choices[0].reason,
        "usage": usage,
    }


# ----------------------------------------------------------------------------- server-sent events
def sse(payload: Any) -> str:
    """One server-sent event: a JSON payload, or a string as it is (``[DONE]``)."""
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


def sse_stream(
    job: Job, buffered: list, source: Iterator, shape: ResponseShape, usage: dict | None = None
) -> Iterator[str]:
    """The text of a streamed response from a job's events (``buffered`` ones first, then
    ``source``, the engine's ``events(job)``, closed at the end: a client that went away
    cancels its rows). An error after the headers went out can only be an event. ``usage``: a
    dict the tokens are counted into as rows finish (what the request cost, for its key)."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0} if usage is None else usage
    failed = False
    try:
        if shape.chat:
            for i in range(job.rows_total):
                yield sse(shape.chunk(i, None, None, role=True))
        pending: list[str] = []
        for event in itertools.chain(buffered, source):
            if isinstance(event, Delta):
                pending.extend(sse(c) for c in shape.text_chunks(event))
            elif isinstance(event, Finished):
                usage["prompt_tokens"] += event.prompt_tokens
                usage["completion_tokens"] += event.completion_tokens
                entries: tuple = ()
                if event.cached and (event.text or event.prompt_text):  # no deltas came
                    entries = (event.prompt_logprobs or ()) + (event.logprobs or ())
                    if shape.tools is None:  # echo: the prompt first
                        whole = event.prompt_text + event.text
                        pending.append(sse(shape.chunk(event.index, whole, None, logprobs=entries)))
                        entries = ()
                pending.extend(sse(c) for c in shape.finish_chunks(event, entries))
            elif isinstance(event, Failed):
                pending.append(sse(api_error_of(event.error).body()))
                failed = True
                break
            # One write for all the events already waiting: under load a thread that fell
            # behind catches up with one socket write instead of one per token.
            if pending and job.events.empty():
                yield "".join(pending)
                pending = []
        if pending:
            yield "".join(pending)
        if not failed and shape.include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield sse(shape.usage_chunk(usage))
    except Exception:
        log.exception("stream failed (request %s)", job.request_id or "-")
        error = APIError(500, "internal server error", "server_error", code="internal_error")
        yield sse(error.body())
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    yield sse("[DONE]")
