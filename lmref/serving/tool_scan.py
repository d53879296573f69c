"""Reading a tool-call block as the model writes it: which call has begun, and its arguments' text.

The block is the SmolLM2 family's ``<tool_call>[{"name": "add", "arguments": {"a": 1}}]</tool_call>``
(``lmref.serving.tool_calls``). ``CallScanner`` is fed the text after ``<tool_call>`` piece by
piece and reports, as soon as the text allows, a call's start (once ``"arguments": {`` follows a
complete name that is a known tool) and each new piece of its arguments' raw JSON text. Inside
the arguments it tracks strings and nesting, so it knows the exact character that closes them:
no piece is held back, and the pieces join to exactly the text the model wrote (what the
non-streamed response returns too). Any other layout (arguments before the name, an unknown
tool) stops it (``broken``): the caller falls back to parsing the whole text at the end.

Hand-written rather than an incremental JSON parser (ijson, jiter's partial mode): those give
values, not the raw text's positions, and a fragment must be the model's text, byte for byte.

Usage::

    from lmref.serving.tool_scan import CallScanner

    scan = CallScanner({"add"})
    scan.feed('[{"name": "add", "arguments": {"a"')   # [(0, "add", ""), (0, None, "{"), (0, None, '"a"')]
    scan.feed(': 1}}]</tool_call>')                    # [(0, None, ': 1}')]; scan.done is True
    scan.calls                                         # [["add", '{"a": 1}', True]]
"""

from __future__ import annotations

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_SPACE = " \t\n\r"  # JSON's whitespace
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_NAME = object()  # the step that reads the function's name
# What precedes a call's arguments, token by token (whitespace allowed between them).
_HEAD = ("{", '"name"', ":", _NAME, ",", '"arguments"', ":", "{")
_WAIT, _BAD = -1, -2  # a token step's outcomes besides "advanced to this position"


class CallScanner:
    """One call block's text, read incrementally. ``feed`` returns events ``(index, name,
    fragment)``: a call's start has its name (fragment ""), later events name None and carry
    the next piece of the arguments. ``calls``: ``[name, arguments so far, complete]`` per call
    begun; ``done``: the block closed; ``broken``: the text left the layout, at ``pos``."""

    def __init__(self, names) -> None:
        self.names = frozenset(names)
        self.text, self.pos = "", 0  # everything fed; where reading stands
        self.calls: list[list] = []
        self.done = self.broken = False
        self._state, self._step, self._bracket = "start", 0, False
        self._name = ""
        self._depth, self._in_string, self._escaped = 0, False, False

    def feed(self, more: str) -> list[tuple[int, str | None, str]]:
        self.text += more
        events: list[tuple[int, str | None, str]] = []
        while not (self.done or self.broken):
            before = (self._state, self._step, self.pos)
            getattr(self, "_" + self._state)(events)
            if (self._state, self._step, self.pos) == before:  # needs more text
                break
        return events

    # Each state reads what it can from self.pos and returns; feed loops while it advances.
    def _skip(self) -> int:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1
        return self.pos

    def _literal(self, token: str) -> int:
        at = self._skip()
        seen = self.text[at : at + len(token)]
        if seen == token:
            return at + len(token)
        return _WAIT if token.startswith(seen) else _BAD

    def _name_token(self) -> int:
        at = self._skip()
        if at == len(self.text):
            return _WAIT
        if self.text[at] != '"':
            return _BAD
        end = self.text.find('"', at + 1)
        name = self.text[at + 1 : len(self.text) if end < 0 else end]
        if not set(name) <= _NAME_CHARS or len(name) > 64:
            return _BAD
        if end < 0:
            return _WAIT
        if name not in self.names:  # never announce a call of a tool that does not exist
            return _BAD
        self._name = name
        return end + 1

    def _advance(self, got: int) -> bool:
        if got == _BAD:
            self.broken = True
        elif got != _WAIT:
            self.pos = got
            return True
        return False

    def _start(self, events: list) -> None:
        at = self._skip()
        if at < len(self.text):
            if self.text[at] not in "[{":
                self.broken = True
                return
            self._bracket = self.text[at] == "["
            self.pos += self._bracket
            self._state, self._step = "head", 0

    def _head(self, events: list) -> None:
        token = _HEAD[self._step]
        got = self._name_token() if token is _NAME else self._literal(token)  # type: ignore[arg-type]
        if not self._advance(got):
            return
        self._step += 1
        if self._step == len(_HEAD):  # the arguments' "{" was just read
            self.calls.append([self._name, "{", False])
            events.append((len(self.calls) - 1, self._name, ""))
            events.append((len(self.calls) - 1, None, "{"))
            self._state, self._step = "arguments", 0
            self._depth, self._in_string, self._escaped = 1, False, False

    def _arguments(self, events: list) -> None:
        start, i = self.pos, self.pos
        while i < len(self.text) and self._depth:
            c = self.text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
            i += 1
        if i > start:
            piece = self.text[start:i]
            self.calls[-1][1] += piece
            events.append((len(self.calls) - 1, None, piece))
            self.pos = i
        if not self._depth:
            self.calls[-1][2] = True
            self._state, self._step = "after", 0

    def _after(self, events: list) -> None:
        if self._step == 0:  # the call object's "}"
            if self._advance(self._literal("}")):
                self._step = 1 if self._bracket else 2
            return
        if self._step == 1:  # another call or the end of the list
            at = self._skip()
            if at == len(self.text):
                return
            if self.text[at] not in ",]":
                self.broken = True
                return
            self.pos = at + 1
            self._state, self._step = ("head", 0) if self.text[at] == "," else ("after", 2)
            return
        if self._advance(self._literal(CLOSE)):
            self.done = True
