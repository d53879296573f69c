"""Tool calling: OpenAI's ``tools`` / ``tool_choice`` checked, rendered, enforced and parsed back.

The call format is the SmolLM2 family's (its model card's tool prompt, from the APIGen data it
was tuned on): ``<tool_call>[{"name": "add", "arguments": {"a": 1}}]</tool_call>``.

- **Check**: ``tool_set(body)`` turns ``tools``, ``tool_choice`` and ``parallel_tool_calls`` into
  a ``ToolSet`` (None: no tools), or a 400 naming what is wrong (a tool's JSON schema is checked
  by llguidance as ``response_format``'s is, so a keyword it cannot enforce is refused by name).
- **Render**: ``render(messages, tools, template)`` gives what ``apply_chat_template`` needs. A
  template that speaks of ``tools`` gets them as transformers passes them (``tools=``, assistant
  ``tool_calls`` with parsed arguments); one that does not (SmolLM2-135M-Instruct's ignores
  them) gets the family's tool prompt as a system block, past calls written in the format above
  and tool results as ``tool`` turns.
- **Enforce**: ``tool_grammar`` is the llguidance grammar of ``required`` (a choice over every
  tool; ``parallel_tool_calls=false`` allows one call) or a named function (one call, its
  arguments' schema). ``auto`` is not constrained: the model writes text or a call.
- **Parse**: ``parse(text, tools)`` gives (content, calls) in OpenAI's shape; text that does not
  parse as calls of known tools stays content. A call's ``arguments`` are the model's own JSON
  text (``lmref.serving.tool_scan`` finds it). ``ToolStream`` does the same for a stream, as
  OpenAI does: content streams until a call may start; a call's id and name go out once the
  name is complete and a known tool, then its arguments piece by piece as generated (they join
  to exactly the non-streamed ``arguments``); parallel calls get indexes 0, 1, ...

Usage::

    from lmref.serving.tool_calls import parse, render, tool_grammar, tool_set

    tools = tool_set(body)                     # or APIError 400; None without tools
    grammar = tool_grammar(tools)              # None for auto
    messages, tools_arg = render(messages, tools, tokenizer.chat_template)
    content, calls = parse(finished.text, tools)   # calls: [{"id": "call_...", ...}]
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

import llguidance

from lmref.serving.constraints import JSON_OPTIONS, Grammar
from lmref.serving.schema import bad
from lmref.serving.tool_scan import CLOSE, OPEN, CallScanner

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
MAX_TOOLS = 128  # OpenAI's limit on tools in one request
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI's default: no arguments
# The SmolLM2 family's tool prompt (SmolLM2-1.7B-Instruct's model card), shortened to its tool
# list and call format: the card's ~200-token preamble would not fit a small context (the
# course's tiny model has 256 tokens) and adds nothing a grammar-forced call needs.
TOOL_PROMPT = (
    "Tools:\n<tools>{tools}</tools>\nTo call tools, answer only with " + OPEN + "[{{"
    '"name": ..., "arguments": {{...}}}}]' + CLOSE + "; else answer in text."
)


@dataclass(frozen=True)
class ToolSet:
    """A request's tools, checked. ``source``: the function definitions as JSON text (hashable:
    it is part of the response cache's key); ``choice``: "auto", "required" or a function's
    name (``named``); ``parallel``: more than one call allowed."""

    source: str
    choice: str = "auto"
    named: bool = False
    parallel: bool = True
    functions: tuple[dict, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "functions", tuple(json.loads(self.source)))

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]


def _check_schema(schema: object, where: str) -> None:
    if not isinstance(schema, dict):
        raise bad(f"'{where}' must be a JSON schema object", "tools")
    try:
        error = llguidance.LLMatcher.validate_grammar(
            llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        )
    except ValueError as exc:
        error = str(exc)
    if error:
        raise bad(f"'{where}' is not supported by this server: {error}", "tools")


def _function(tool: object, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad(f"'{where}.type' must be 'function'", "tools")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise bad(f"'{where}.function' must be an object", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad(f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-'", "tools")
    description = fn.get("description", "")
    if not isinstance(description, str):
        raise bad(f"'{where}.function.description' must be a string", "tools")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise bad(f"'{where}.function.strict' must be a boolean", "tools")
    parameters = fn.get("parameters", EMPTY_PARAMETERS)
    _check_schema(parameters, f"{where}.function.parameters")
    # strict or not, a forced call's arguments follow the schema (a grammar cannot half-apply)
    return {"name": name, "description": description, "parameters": parameters}


def tool_set(body: dict) -> ToolSet | None:
    """The request's tools (None: none, or ``tool_choice`` "none"); a 400 naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad(f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
    functions = [_function(t, i) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        raise bad("'tools' names a function twice", "tools")
    named = isinstance(choice, dict)
    if named:
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad(
                "'tool_choice' must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if name not in names:
            raise bad(
                f"'tool_choice' names function {name!r}, which is not in 'tools'", "tool_choice"
            )
        choice = name
    elif choice is None:
        choice = "auto"
    elif choice not in ("none", "auto", "required"):
        raise bad(
            f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {choice!r}",
            "tool_choice",
        )
    if choice == "none":  # OpenAI: the model does not call, and we do not show it the tools
        return None
    source = json.dumps(functions, separators=(",", ":"))
    return ToolSet(source, choice, named, True if parallel is None else parallel)


def _literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a Lark string literal too


def tool_grammar(tools: ToolSet | None) -> Grammar | None:
    """The grammar a forced call must match (``required`` or named); None for ``auto``."""
    if tools is None or tools.choice == "auto":
        return None
    picked = [f for f in tools.functions if not tools.named or f["name"] == tools.choice]
    # A named function is called once (vLLM's reading too); required may call several unless
    # parallel_tool_calls is false: a weak model can repeat calls until max_tokens otherwise.
    more = f" ({_literal(', ')} call)*" if tools.parallel and not tools.named else ""
    lines = [f"start: {_literal(OPEN + '[')} call{more} {_literal(']' + CLOSE)}"]
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(picked))))
    for i, f in enumerate(picked):
        head = '{"name": ' + json.dumps(f["name"]) + ', "arguments": '
        lines.append(f"call_{i}: {_literal(head)} args_{i} {_literal('}')}")
        schema = {**f["parameters"], "x-guidance": JSON_OPTIONS}  # the same JSON layout
        lines.append(f"args_{i}: %json {json.dumps(schema)}")
    return Grammar("lark", "\n".join(lines) + "\n")


def _call_text(calls: list) -> str:
    out = []
    for c in calls:
        fn = c["function"]
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            args = fn["arguments"]
        out.append({"name": fn["name"], "arguments": args})
    return OPEN + json.dumps(out) + CLOSE


def render(messages: list[dict], tools: ToolSet | None, template: str) -> tuple[list, list | None]:
    """(messages, ``tools=`` for ``apply_chat_template``) for ``template`` (see the module)."""
    openai_tools = (
        None if tools is None else [{"type": "function", "function": f} for f in tools.functions]
    )
    if "tools" in template or "tool_calls" in template:  # the template renders them itself
        native = []
        for m in messages:
            if "tool_calls" in m:
                calls = [
                    {
                        **c,
                        "function": {
                            **c["function"],
                            "arguments": json.loads(c["function"]["arguments"]),
                        },
                    }
                    for c in m["tool_calls"]
                ]
                m = {**m, "tool_calls": calls}
            native.append(m)
        return native, openai_tools
    out = []
    for m in messages:
        if "tool_calls" in m:
            m = {
                "role": "assistant",
                "content": (m.get("content") or "") + _call_text(m["tool_calls"]),
            }
        elif m["role"] == "tool":
            m = {"role": "tool", "content": m["content"]}
        out.append(m)
    if tools is not None:
        block = TOOL_PROMPT.format(tools=json.dumps(list(tools.functions)))  # APIGen's shape
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": block + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


def _calls(payload: str, tools: ToolSet) -> list[dict] | None:
    try:
        found = json.loads(payload)
    except ValueError:
        return None
    found = [found] if isinstance(found, dict) else found
    if not isinstance(found, list) or not found:
        return None
    calls = []
    for c in found:
        if not isinstance(c, dict) or c.get("name") not in tools.names:
            return None
        args = c.get("arguments", {})
        if not isinstance(args, dict):
            return None
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(args)},
            }
        )
    return calls


def _split(text: str, tools: ToolSet | None) -> tuple[int, int, list[dict]]:
    """(where the call block starts, where it ends, the calls); no calls: (-1, -1, [])."""
    start = text.find(OPEN) if tools is not None else -1
    if start < 0:
        return -1, -1, []
    # The scanner knows where the block closes even when an argument's string holds CLOSE;
    # for a layout it does not follow, the first CLOSE ends the block.
    scan = CallScanner(tools.names)  # type: ignore[union-attr]
    scan.feed(text[start + len(OPEN) :])
    close = start + len(OPEN) + scan.pos - len(CLOSE) if scan.done else text.find(CLOSE, start)
    end = len(text) if close < 0 else close + len(CLOSE)
    calls = _calls(text[start + len(OPEN) : close if close >= 0 else len(text)], tools)  # type: ignore[arg-type]
    if calls is None:
        return -1, -1, []
    # A call's arguments are the model's own text where the scanner read them (what a stream
    # sends, fragment by fragment), re-serialised only for a layout it does not follow.
    for call, (name, arguments, complete) in zip(calls, scan.calls, strict=False):
        if complete and call["function"]["name"] == name:
            call["function"]["arguments"] = arguments
    return start, end, calls


def parse(text: str, tools: ToolSet | None) -> tuple[str | None, list[dict]]:
    """(content, calls): content is None when the text was only calls; text that is not a
    well-formed call of a known tool stays content, with no calls."""
    start, end, calls = _split(text, tools)
    if not calls:
        return text, []
    return (text[:start] + text[end:]).strip() or None, calls


def call_deltas(calls: list[dict], pieces: int = 3, first: int = 0) -> list[list[dict]]:
    """OpenAI's streamed ``tool_calls`` deltas: per call, id, type and name (arguments ""), then
    the arguments in ``pieces`` fragments, what the openai client and LangChain join back.
    ``first``: the index of the first of ``calls`` (calls before it were streamed already)."""
    out = []
    for i, c in enumerate(calls, start=first):
        fn = c["function"]
        out.append([_header(i, c["id"], fn["name"])])
        args, size = fn["arguments"], max(1, -(-len(fn["arguments"]) // pieces))
        out += [
            [{"index": i, "function": {"arguments": args[k : k + size]}}]
            for k in range(0, len(args), size)
        ]
    return out


def _header(index: int, call_id: str, name: str) -> dict:
    return {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }


class ToolStream:
    """One streamed choice with tools. ``push`` returns the text safe to send as content (held
    back from where a call may start) and the ``tool_calls`` deltas the text allows so far: a
    call's id, type and name once its name is complete, is a known tool and ``"arguments": {``
    follows, then each new piece of its arguments as written; ``finish`` what is still owed."""

    def __init__(self, tools: ToolSet):
        self.tools, self.text, self.sent = tools, "", 0
        self.entries: tuple = ()  # logprob entries of text held back, sent with it later
        self.start = -1  # where the call block opens, once seen
        self.scan = CallScanner(tools.names)
        self.ids: list[str] = []

    def push(self, text: str) -> tuple[str, list[list[dict]]]:
        self.text += text
        if self.start >= 0:
            return "", self._deltas(self.scan.feed(text))
        start = self.text.find(OPEN)
        if start < 0:  # hold a tail that could be the start of OPEN
            start = next(
                (
                    k
                    for k in range(max(self.sent, len(self.text) - len(OPEN) + 1), len(self.text))
                    if OPEN.startswith(self.text[k:])
                ),
                len(self.text),
            )
            safe, self.sent = self.text[self.sent : max(start, self.sent)], max(start, self.sent)
            return safe, []
        safe, self.sent, self.start = self.text[self.sent : start], start, start
        return safe, self._deltas(self.scan.feed(self.text[start + len(OPEN) :]))

    def _deltas(self, events: list[tuple[int, str | None, str]]) -> list[list[dict]]:
        out: list[list[dict]] = []
        for index, name, piece in events:
            if name is not None:
                self.ids.append("call_" + uuid.uuid4().hex[:24])
                out.append([_header(index, self.ids[index], name)])
            elif out and "id" not in out[-1][0] and out[-1][0]["index"] == index:
                out[-1][0]["function"]["arguments"] += piece  # one delta per call and push
            else:
                out.append([{"index": index, "function": {"arguments": piece}}])
        return out

    def finish(self, text: str) -> tuple[str, list[list[dict]], bool]:
        """(content still owed, the deltas still owed, whether the choice called tools).
        ``text``: the choice's whole text (a cached answer streams nothing before). Calls
        whose start went out stay calls: text that then fails to parse (a call cut by
        ``max_tokens``, broken JSON) is not sent again as content, what lies past the point
        where the layout broke is."""
        owed, deltas = self.push(text[len(self.text) :]) if text.startswith(self.text) else ("", [])
        _, end, calls = _split(text, self.tools)
        begun = len(self.scan.calls)
        if calls:
            deltas += call_deltas(calls[begun:], first=begun)
            return owed + text[end:], deltas, True
        if not begun:
            return owed + text[self.sent :], deltas, False
        if self.scan.broken or self.scan.done:
            owed += self.scan.text[self.scan.pos :]
        return owed, deltas, True
