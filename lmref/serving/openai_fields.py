"""What of the OpenAI API this server speaks: OpenAI's request fields and endpoints, each one's
support found by asking the server's own request checks, so that the OpenAPI document
(``lmref.serving.openapi``) and the compatibility table (``lmref.lab.api_docs``) cannot drift
from what the server does.

A field's support is probed, not written down: ``shape_request`` (the check every chat and
completions request passes, HTTP and Batch alike) gets one body with a value a client would
send and one with a value of the wrong type. Refused with ``unsupported_parameter`` naming it:
**refused**; the good value taken and the wrong one a 400 naming it: **supported**; both taken:
**ignored** (accepted so that clients which send it work, no effect). ``model`` and ``user``
are read by the router (``ServingState.resolve``), not by ``shape_request``: said by the field.
A field a helper implements later changes its row by itself. Standard library and
``lmref.serving.shaping`` only: no web framework.

Usage::

    from lmref.serving.openai_fields import field_support

    for name, s in field_support(chat=True).items():
        print(name, s.status, s.how)          # e.g. tools refused "400 unsupported_parameter"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmref.serving.schema import UNSUPPORTED, APIError
from lmref.serving.shaping import shape_request

STR, INT, NUM, BOOL = (
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
)
OBJ, ARR = {"type": "object"}, {"type": "array"}
NULLABLE_OBJ = {"type": ["object", "null"]}
STOP = {"anyOf": [STR, {"type": "array", "items": STR}, {"type": "null"}]}
MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"anyOf": [STR, {"type": "array", "items": OBJ}, {"type": "null"}]},
            "tool_calls": {"type": "array", "items": OBJ},
            "tool_call_id": STR,
        },
    },
}
PROMPT = {
    "anyOf": [
        STR,
        {"type": "array", "items": STR},
        {"type": "array", "items": INT},
        {"type": "array", "items": {"type": "array", "items": INT}},
    ]
}
TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@dataclass(frozen=True)
class Field:
    """One request field: its JSON schema, a value a client sends (``sample``), one of the wrong
    type (``wrong``), the fields it needs beside it (``needs``), which endpoints take it, and a
    note for the table. ``router``: read by ``ServingState.resolve``, not ``shape_request``."""

    name: str
    schema: dict
    sample: Any
    wrong: Any = "not-this"
    needs: dict = field(default_factory=dict)
    chat: bool = True
    completions: bool = True
    note: str = ""
    router: bool = False


# OpenAI's request fields of POST /v1/chat/completions and POST /v1/completions (API reference,
# 2026), plus the two vLLM extensions lmref takes (ignore_eos; echo on completions is OpenAI's).
FIELDS = (
    Field(
        "model",
        STR,
        "m",
        5,
        note="a served version or an A/B alias; default: the first",
        router=True,
    ),
    Field(
        "messages",
        MESSAGES,
        [{"role": "user", "content": "hi"}],
        "hi",
        completions=False,
        note="text content parts only; assistant tool_calls and tool results",
    ),
    Field("prompt", PROMPT, "hi", 5, chat=False, note="strings or token ids, up to 64"),
    Field("max_tokens", INT, 2, "x"),
    Field("max_completion_tokens", INT, 2, "x", completions=False),
    Field("temperature", NUM, 0.5, "x"),
    Field("top_p", NUM, 0.9, "x"),
    Field("n", INT, 1, "x", note="1 to 16"),
    Field("seed", INT, 1, "x", note="choice k gets seed + k"),
    Field("stop", STOP, ["\n"], 5, note="at most --max-stop-strings"),
    Field("stream", BOOL, True, "x", note="server-sent events"),
    Field("stream_options", OBJ, {"include_usage": True}, "x", needs={"stream": True}),
    Field("logprobs", BOOL, True, "x", completions=False),
    Field("top_logprobs", INT, 2, "x", needs={"logprobs": True}, completions=False, note="0 to 20"),
    Field("logprobs", INT, 2, "x", chat=False, note="0 to 20"),
    Field("echo", BOOL, True, "x", needs={"max_tokens": 1}, chat=False),
    Field("echo", BOOL, True, "x", completions=False),
    Field("ignore_eos", BOOL, True, "x", note="vLLM's extension"),
    Field("user", STR, "alice", 5, note="keeps one user on one version of an alias", router=True),
    Field("response_format", OBJ, {"type": "json_object"}, completions=False),
    Field(
        "tools",
        ARR,
        TOOL,
        completions=False,
        note="functions with JSON-schema parameters; the SmolLM2 family's call format",
    ),
    Field(
        "tool_choice",
        {"anyOf": [STR, OBJ]},
        "required",
        5,
        needs={"tools": TOOL},
        completions=False,
        note="none, auto, required or a function; required and named are enforced by grammar",
    ),
    Field(
        "parallel_tool_calls",
        BOOL,
        False,
        needs={"tools": TOOL},
        completions=False,
        note="false: one call at most",
    ),
    Field("functions", ARR, [{"name": "f", "parameters": {"type": "object"}}], completions=False),
    Field("function_call", {"anyOf": [STR, OBJ]}, "auto", 5, completions=False),
    Field("presence_penalty", NUM, 0.5),
    Field("frequency_penalty", NUM, 0.5),
    Field("logit_bias", OBJ, {"1": -50}),
    Field("suffix", STR, "end", 5, chat=False),
    Field("best_of", INT, 2, chat=False),
    Field("store", BOOL, False, completions=False),
    Field("metadata", OBJ, {"k": "v"}, completions=False),
    Field("service_tier", STR, "auto", 5, completions=False),
    Field("modalities", ARR, ["text", "audio"], completions=False),
    Field("audio", NULLABLE_OBJ, {"voice": "alloy", "format": "wav"}, completions=False),
    Field("prediction", OBJ, {"type": "content", "content": "x"}, completions=False),
    Field("reasoning_effort", STR, "low", 5, completions=False),
    Field("verbosity", STR, "low", 5, completions=False),
    Field("web_search_options", OBJ, {}, completions=False),
    Field("prompt_cache_key", STR, "k", 5, completions=False),
    Field("safety_identifier", STR, "s", 5, completions=False),
)


@dataclass(frozen=True)
class Support:
    """A field's support: ``supported``, ``refused``, ``ignored`` or ``unverified`` (the probe
    got an answer it cannot read: a catalogue sample the server now checks differently), and
    how, in words for the table."""

    field: Field
    status: str
    how: str


def fields_of(chat: bool) -> list[Field]:
    return [f for f in FIELDS if (f.chat if chat else f.completions)]


def _probe(body: dict, config: Any, chat: bool) -> APIError | None:
    try:
        shape_request(body, config, chat)
    except APIError as err:
        return err
    return None


def _default_config() -> Any:
    from lmref.serving.config import ServingConfig  # what a server runs with by default
    from lmref.serving.engine import ModelSpec

    return ServingConfig(models=[ModelSpec("m", "unused")], api_keys=[])


def support_of(f: Field, chat: bool, config: Any = None) -> Support:
    """Ask the server's request check how it treats ``f`` (see the module's docstring)."""
    config = config or _default_config()
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    base = {**base, **f.needs}
    good = _probe({**base, f.name: f.sample}, config, chat)
    if good is not None:
        if good.code == "unsupported_parameter" and good.param == f.name:
            unused = UNSUPPORTED.get(f.name)
            also = f"; {' or '.join(map(repr, unused))} taken as unset" if unused else ""
            return Support(f, "refused", f"400 unsupported_parameter naming it{also}")
        return Support(f, "unverified", f"the probe got {good.status}: {good.message}")
    if f.router:
        return Support(f, "supported", f.note)
    wrong = _probe({**base, f.name: f.wrong}, config, chat)
    if wrong is not None and wrong.param == f.name:
        return Support(f, "supported", f"{f.note}; a bad value is a 400 naming it".lstrip("; "))
    return Support(f, "ignored", "accepted and ignored: no effect")


def field_support(chat: bool, config: Any = None) -> dict[str, Support]:
    """Every OpenAI field of chat (``chat=True``) or completions, by name, with its support.
    ``config``: the server's ``ServingConfig`` (its limits); default: the defaults."""
    config = config or _default_config()
    return {f.name: support_of(f, chat, config) for f in fields_of(chat)}


# OpenAI's endpoints (API reference, 2026): (method, path, group).
OPENAI_ENDPOINTS = (
    ("POST", "/v1/chat/completions", "Chat Completions"),
    ("POST", "/v1/completions", "Completions (legacy)"),
    ("GET", "/v1/models", "Models"),
    ("GET", "/v1/models/{model}", "Models"),
    ("DELETE", "/v1/models/{model}", "Models"),
    ("POST", "/v1/files", "Files"),
    ("GET", "/v1/files", "Files"),
    ("GET", "/v1/files/{file_id}", "Files"),
    ("DELETE", "/v1/files/{file_id}", "Files"),
    ("GET", "/v1/files/{file_id}/content", "Files"),
    ("POST", "/v1/uploads", "Uploads"),
    ("POST", "/v1/batches", "Batch"),
    ("GET", "/v1/batches", "Batch"),
    ("GET", "/v1/batches/{batch_id}", "Batch"),
    ("POST", "/v1/batches/{batch_id}/cancel", "Batch"),
    ("POST", "/v1/embeddings", "Embeddings"),
    ("POST", "/v1/responses", "Responses"),
    ("GET", "/v1/responses/{response_id}", "Responses"),
    ("POST", "/v1/conversations", "Conversations"),
    ("POST", "/v1/audio/speech", "Audio"),
    ("POST", "/v1/audio/transcriptions", "Audio"),
    ("POST", "/v1/audio/translations", "Audio"),
    ("POST", "/v1/images/generations", "Images"),
    ("POST", "/v1/images/edits", "Images"),
    ("POST", "/v1/moderations", "Moderations"),
    ("POST", "/v1/fine_tuning/jobs", "Fine-tuning"),
    ("GET", "/v1/fine_tuning/jobs", "Fine-tuning"),
    ("POST", "/v1/assistants", "Assistants (beta)"),
    ("POST", "/v1/threads", "Assistants (beta)"),
    ("POST", "/v1/threads/{thread_id}/runs", "Assistants (beta)"),
    ("POST", "/v1/vector_stores", "Vector stores"),
    ("POST", "/v1/realtime/sessions", "Realtime"),
    ("POST", "/v1/evals", "Evals"),
)
