"""Token ids to text as they are generated: O(1) work a token, stop strings, and a safe stream.

Decoding the whole output again at every token (what the engine did before) costs O(n) a token,
O(n^2) a reply. ``IncrementalDetokenizer`` decodes a small window instead: with a fast tokenizer
it is ``tokenizers.decoders.DecodeStream`` (Rust); with any other it is the same algorithm in
Python (decode the window from one token before the last emitted text, keep what is new: the
prefix/read offsets of Hugging Face's ``TextStreamer`` and vLLM). Either way a character split
over tokens (UTF-8 bytes of byte-level BPE) comes out only once its last byte came: the text so
far is what a full decode gives with its trailing U+FFFD (an unfinished character) cut off.

``TextStream`` adds what a server needs on top: stop strings searched only over the new text
(plus the last ``len(stop) - 1`` characters), and the streamable text, which holds back any end
that could be the start of a stop string (``held_back``), so a client never sees part of a stop.

Usage::

    from lmref.serving.detokenizer import TextStream

    stream = TextStream(tokenizer, stops=("\\n\\n",))
    for token in generated:
        stop_at = stream.push(token)            # index where a stop string starts, or None
        send(stream.take_safe())                # new text a client may see ("" if none)
        if stop_at is not None:
            text = stream.text[:stop_at]; break
"""

from __future__ import annotations

import logging

log = logging.getLogger("lmref.serving.detokenizer")


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class _WindowDecoder:
    """DecodeStream's algorithm over any tokenizer's ``decode``: the text of the tokens from
    ``prefix`` on, minus the text of ``prefix:read`` (already emitted), is new once it does not
    end in U+FFFD. Decoding from one token early keeps tokenizers that drop a leading space
    (SentencePiece) right; the window stays a few tokens long unless bytes never complete."""

    def __init__(self, tokenizer, skip_special_tokens: bool, ids: list[int], start: int) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = ids  # shared with the owner, which appends before each step
        self.prefix, self.read = max(0, start - 1), start

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False
        )

    def step(self) -> str | None:
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return None


class IncrementalDetokenizer:
    """Text of generated ids, one token at a time: ``push(id)`` returns the text that became
    final with it, so the returned pieces always join to a full decode of the ids so far minus
    an unfinished character at its end (what the engine searched for stops before).

    DecodeStream holds a token's text back whole until its last character completes (" 😀" may
    be one token " \xf0\x9f" and the next "\x98\x80"); the space before that character is final
    already, so while a character is pending its token's text is decoded on its own window (a
    few tokens) and the settled part returned at once: the "provisional" text."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.length = 0  # characters returned so far
        self.unsettled = 0  # U+FFFD a full decode has after them (an unfinished character)
        self._emitted_ids = 0  # tokens whose text a chunk completed
        self._provisional = ""  # returned text of the tokens after those (a pending character)
        self._chunks: list[str] = []
        fast = getattr(tokenizer, "is_fast", False)
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if fast else None
        self._stream, self._window = None, None
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        else:
            self._window = _WindowDecoder(tokenizer, skip_special_tokens, self.ids, 0)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:  # what a fast tokenizer's decode() runs, minus its checks
            return self._backend.decode(ids, skip_special_tokens=self.skip)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False
        )

    def _step(self, token_id: int) -> str | None:
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, token_id)
            except Exception as exc:  # DecodeStream's "invalid prefix": the window goes on
                log.warning("DecodeStream failed (%s); decoding by windows from here", exc)
                self._stream = None
                self._window = _WindowDecoder(
                    self.tokenizer, self.skip, self.ids, self._emitted_ids
                )
        return self._window.step()

    def _pending_text(self) -> str:
        """The final part of the text of the tokens no chunk completed yet (and, in
        ``unsettled``, how many U+FFFD follow it). Bytes that never form a character (a random
        model's output) keep this window growing: then a token costs O(window), as it does
        DecodeStream itself."""
        done, first = self._emitted_ids, max(0, self._emitted_ids - 1)  # one token of context
        before, now = self._decode(self.ids[first:done]), self._decode(self.ids[first:])
        if not now.startswith(before):
            self.unsettled = 0
            return ""
        pending = now[len(before) :]
        settled = pending.rstrip("\ufffd")
        self.unsettled = len(pending) - len(settled)
        return settled

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        chunk = self._step(token_id)
        if chunk is not None:
            self._emitted_ids, self.unsettled = len(self.ids), 0
            provisional, self._provisional = self._provisional, ""
            if not chunk.startswith(provisional):  # no tokenizer seen does this; say so
                log.warning("decoded text changed after it was final: %r", provisional)
            new = chunk[len(provisional) :]
        else:
            pending = self._pending_text()
            if not pending.startswith(self._provisional):
                return ""
            new, self._provisional = pending[len(self._provisional) :], pending
        if new:
            self._chunks.append(new)
            self.length += len(new)
        return new

    @property
    def text(self) -> str:
        """All settled text (joined on demand: O(n), for the end of a reply, not each token)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""


class TextStream:
    """A request's text as tokens come: stop strings found, and (``stream``) the part safe to
    send. Without ``stream`` the unsent text is not kept (a stop search needs the tail only)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), stream: bool = True) -> None:
        self.decoder = IncrementalDetokenizer(tokenizer)
        self.stops, self.stream = stops, stream
        self._longest = max(map(len, stops), default=0)
        self._tail = ""  # the last len(longest stop) - 1 settled characters: a stop may span
        self._unsent = ""  # settled text not yet taken by take_safe() (stream only)
        self.sent = 0  # characters taken by take_safe()

    @property
    def settled(self) -> int:
        """Characters of final text so far (the text a full decode gives, minus an unfinished
        character at its end)."""
        return self.decoder.length

    @property
    def text(self) -> str:
        """What a full decode gives: the settled text and an unfinished character's U+FFFD."""
        return self.decoder.text + "\ufffd" * self.decoder.unsettled

    def push(self, token_id: int) -> int | None:
        """Add a token; the index in ``text`` where the first stop string starts, if one now
        appears (the earliest, as a search of the whole decode would find: a stop string may
        even match the U+FFFD of bytes that do not form a character)."""
        start = self.decoder.length  # where the new chunk begins in the text
        chunk = self.decoder.push(token_id)
        if chunk and self.stream:
            self._unsent += chunk
        if not self.stops or not (chunk or self.decoder.unsettled):
            return None
        window = self._tail + chunk + "\ufffd" * self.decoder.unsettled
        offset = start - len(self._tail)
        hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        if self._longest > 1:
            self._tail = (self._tail + chunk)[-(self._longest - 1) :]
        return offset + min(hits) if hits else None

    def take_safe(self) -> str:
        """New text a client may see: settled, and not a possible start of a stop string."""
        safe = len(self._unsent) - held_back(self._unsent, self.stops)
        if safe <= 0:
            return ""
        out, self._unsent = self._unsent[:safe], self._unsent[safe:]
        self.sent += len(out)
        return out
