"""The OpenAI API's shapes for the model server: request fields checked, responses shaped.

Validation turns a JSON body into sampling settings (the fields of a serving engine's
``SamplingParams``) or raises ``APIError``, a 400 that names the field at fault; fields the
server does not implement are refused by name rather than ignored. Response shaping writes
log-probabilities the way OpenAI does: chat ``choices[].logprobs.content[]`` of ``{token,
logprob, bytes, top_logprobs}``, and the legacy completions ``{tokens, token_logprobs,
top_logprobs, text_offset}`` that lm-evaluation-harness reads (entries: any objects with
``token``, ``bytes``, ``logprob`` and ``top``). Standard library only; request and response
shaping (``lmref.serving.shaping``) builds on it, for the Flask app and the Batch worker alike.

Usage::

    from lmref.serving.schema import APIError, chat_logprobs, sampling_fields

    fields, n = sampling_fields({"max_tokens": 8, "logprobs": True, "top_logprobs": 2},
                                config, chat=True)        # config: a ServingConfig
    params = SamplingParams(**fields)                     # lmref.serving.engine's
    choice["logprobs"] = chat_logprobs(finished.logprobs)  # {"content": [...], "refusal": None}
"""

from __future__ import annotations

import json
import math
from typing import Any

# Fields of the OpenAI API this server does not implement, with the values that mean "not used"
# (clients such as lm-eval send the defaults): anything else is a 400 naming the field.
UNSUPPORTED = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "suffix": (None, ""),
    "best_of": (None, 1),
    # Output the server cannot give: a client that asks for audio or a web search and silently
    # gets plain text would be misled (fields that only tune cost or bookkeeping, such as
    # store, service_tier or prediction, are accepted and ignored instead: docs/openai_compatibility.md).
    "modalities": (None, ["text"]),
    "audio": (None,),
    "web_search_options": (None,),
}
# Chat-only fields: on the legacy completions route they are refused as above.
CHAT_ONLY = {"tools": (None, []), "tool_choice": (None, "none")}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_BIAS = 100  # OpenAI's bound on a logit_bias value, either sign
MAX_LOGIT_BIAS = 1024  # entries in one logit_bias (OpenAI names no limit; a body must end)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs (vLLM's default too)


class APIError(Exception):
    """An error a client sees, in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# HTTP errors raised below the routes (werkzeug's; waitress's, see lmref.serving.server) in
# OpenAI terms.
HTTP_ERRORS = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "queue_full"),
    431: ("invalid_request_error", "request_header_fields_too_large"),
    503: ("service_unavailable_error", "unavailable"),
}


def bad(message: str, param: str | None = None) -> APIError:
    """A 400 naming the field at fault."""
    return APIError(400, message, param=param, code="invalid_value")


def number(
    body: dict,
    name: str,
    default: Any,
    low: float,
    high: float,
    low_open: bool = False,
    integer: bool = False,
) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if value < low or value > high or (low_open and value == low):
        raise bad(
            f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name
        )
    return value if integer else float(value)


def integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    return number(body, name, default, low, high, integer=True)


def text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise bad(f"'{param}' must be a string", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"'{param}' is not valid unicode", param) from None
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean", name)
    return bool(value)


def _logprobs(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(top alternatives per token or None for no logprobs, echo). Chat: ``logprobs: true`` and
    ``top_logprobs: k``; completions: ``logprobs: k`` (an integer) and ``echo``."""
    if chat:
        if body.get("echo") not in (None, False):
            raise APIError(
                400,
                "'echo' is not supported by this server on chat completions",
                param="echo",
                code="unsupported_parameter",
            )
        top = integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if not flag(body, "logprobs"):
            if top is not None:
                raise bad("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
            return None, False
        return top or 0, False
    logprobs = (
        None
        if body.get("logprobs") is False
        else integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    )
    return logprobs, flag(body, "echo")


def logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """``logit_bias``: {token id as a string: bias in [-100, 100]} as sorted (id, bias) pairs;
    whether the ids are in the vocabulary is the engine's check (``lmref.serving.prompts``)."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise bad(
            f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids", "logit_bias"
        )
    pairs = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10):
            raise bad(
                f"'logit_bias' keys must be token ids (digit strings), got {key!r}", "logit_bias"
            )
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise bad(f"'logit_bias' values must be numbers, got {bias!r}", "logit_bias")
        if abs(bias) > MAX_BIAS:
            raise bad(f"'logit_bias' values must be in [-100, 100], got {bias}", "logit_bias")
        pairs[int(key)] = float(bias)
    return tuple(sorted(pairs.items()))


def sampling_fields(body: dict, config: Any, chat: bool) -> tuple[dict[str, Any], int]:
    """The request's sampling settings (``SamplingParams`` fields) and ``n`` (choices per
    prompt). ``config``: a ``ServingConfig`` (``max_tokens_limit``, ``default_max_tokens``,
    ``max_stop_strings``)."""
    for name, unused in {**UNSUPPORTED, **({} if chat else CHAT_ONLY)}.items():
        if body.get(name, None) not in unused:
            raise APIError(
                400,
                f"'{name}' is not supported by this server",
                param=name,
                code="unsupported_parameter",
            )
    logprobs, echo = _logprobs(body, chat)
    n = integer(body, "n", 1, 1, 16)
    limit = config.max_tokens_limit or (1 << 31)
    name = (
        "max_completion_tokens"
        if chat and body.get("max_completion_tokens") is not None
        else "max_tokens"
    )
    # Chat without max_tokens runs to EOS or the context, as OpenAI's does; completions keep
    # OpenAI's default of 16. max_tokens 0 only with echo: score the prompt, generate nothing.
    default = config.max_tokens_limit if chat else min(config.default_max_tokens, limit)
    max_tokens = integer(body, name, default, 0 if echo else 1, limit)
    stop = body.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, tuple | list):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > config.max_stop_strings:
        raise bad(f"at most {config.max_stop_strings} stop strings are allowed", "stop")
    for s in stops:
        if not text(s, "stop"):
            raise bad("stop strings must not be empty", "stop")
    return dict(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=integer(body, "seed", None, -(1 << 63), (1 << 64) - 1),
        stop=tuple(stops),
        ignore_eos=flag(body, "ignore_eos"),
        logprobs=logprobs,
        echo=echo,
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=logit_bias(body),
    ), n


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
    return stream, include


def _tool_calls(value: Any) -> list[dict]:
    """An assistant message's ``tool_calls``, checked: id, type function, name, arguments (a
    JSON string, as OpenAI's client sends it back)."""
    if not isinstance(value, list) or not value:
        raise bad("an assistant message's 'tool_calls' must be a non-empty list", "messages")
    calls = []
    for c in value:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or c.get("type", "function") != "function":
            raise bad("each of 'tool_calls' needs type 'function' and a 'function'", "messages")
        arguments = text(fn.get("arguments", "{}"), "messages")
        try:
            json.loads(arguments)
        except ValueError:
            raise bad(
                "a tool call's 'function.arguments' must be a JSON string", "messages"
            ) from None
        calls.append(
            {
                "id": text(c.get("id", ""), "messages"),
                "type": "function",
                "function": {"name": text(fn.get("name"), "messages"), "arguments": arguments},
            }
        )
    return calls


def chat_messages(body: dict) -> list[dict]:
    """``messages``, checked: text content (parts joined), an assistant's ``tool_calls`` (its
    content may then be null) and ``tool`` results with their ``tool_call_id``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > 256:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(
                "each message needs a role: system, developer, user, assistant or tool", "messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is served here
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad("only text content parts are supported", "messages")
                parts.append(text(part.get("text"), "messages"))
            content = "".join(parts)
        message: dict[str, Any] = {"role": m["role"]}
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"])
            content = "" if content is None else content
        if m["role"] == "tool":
            message["tool_call_id"] = text(m.get("tool_call_id"), "messages")
        message["content"] = text(content, "messages")
        clean.append(message)
    return clean


def completion_prompts(body: dict, most: int = 64) -> list[str | list[int]]:
    """``prompt`` as OpenAI takes it: a string, a list of strings, a list of token ids or a list
    of such lists (lm-evaluation-harness sends token ids)."""
    prompt = body.get("prompt")

    def token_ids(value: list) -> bool:
        return bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, list) and token_ids(prompt):
        prompts: list = [prompt]
    else:
        prompts = prompt if isinstance(prompt, list) else [prompt]
    if not prompts or len(prompts) > most:
        raise bad(
            f"'prompt' must be a string, token ids, or a list of 1 to {most} of them", "prompt"
        )
    out = []
    for p in prompts:
        if isinstance(p, list):
            if not token_ids(p) or min(p) < 0:
                raise bad("a token-id prompt must be a non-empty list of integers >= 0", "prompt")
            out.append(list(p))
        else:
            out.append(text(p, "prompt"))
    return out


def _top(entry) -> list[dict]:
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in entry.top]


def chat_logprobs(entries) -> dict:
    """Chat's ``choices[].logprobs`` (also one streamed chunk's): entries are the engine's
    ``TokenLogprob``s."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.bytes),
                "top_logprobs": _top(e),
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries, text_offset: int = 0) -> dict:
    """The legacy completions ``logprobs``. ``top_logprobs[i]`` maps token text to logprob for
    the k likeliest tokens plus the chosen one (vLLM's choice too: a client can tell whether the
    chosen token was the likeliest); a prompt's first token has None in both lists.
    ``text_offset``: each token's start in the returned text, counted from ``text_offset``."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for e in entries:
        out["tokens"].append(e.token)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(
            None
            if e.logprob is None
            else {**{t.token: t.logprob for t in e.top}, e.token: e.logprob}
        )
        out["text_offset"].append(text_offset)
        text_offset += len(e.token)
    return out
