"""Decoding text files in any encoding: UTF-8, UTF-8/16 with a byte order mark, UTF-16 without one,
and legacy code pages (GB18030/GBK, Big5, Shift-JIS, EUC, Windows-1251/1252, Latin-1).

Order of decisions for one file's bytes (``decode_bytes``):

1. A byte order mark (UTF-8, UTF-16, UTF-32) decides.
2. NUL bytes without a BOM: UTF-16 when they sit on one parity only (ASCII-heavy UTF-16) or the
   file has 64 bytes or more and charset-normalizer accepts it as UTF-16; otherwise binary, skipped.
3. Valid UTF-8 is UTF-8 (then mojibake repair, below).
4. Bytes that are mostly valid UTF-8 (at least one valid multi-byte sequence) but hold a few bad
   bytes are a damaged UTF-8 file, not a legacy one: the bad bytes are counted and handled by
   ``on_decode_error`` (replace with U+FFFD, drop, skip the file, raise).
5. Anything else goes to ``charset-normalizer`` restricted to ``DecodeConfig.candidates``; ties
   (same chaos and coherence) go to the first candidate in that order, so GB18030 wins over
   EUC-KR and Windows-1252 over Windows-1251 on short text. No match: the file is *undecodable*,
   skipped and named by the caller, never silently replaced.

Mojibake repair with ``ftfy.fix_encoding`` is "safe" here in a narrow sense: it runs only on text
that decoded as strict UTF-8 (the only case where ``Ã©``-style sequences are mis-decoded UTF-8
rather than legitimate characters), never on text decoded from a legacy code page (GBK text is
full of byte pairs ftfy could misread), and only ``fix_encoding``, not ftfy's other fixes
(quotes, width, line breaks: the cleaning step's business). A document *about* mojibake would be
"repaired" too: turn it off with ``fix_mojibake=False``.

Limits: detection on a few bytes is a guess (a 10-byte Latin-1 line is also valid Windows-1251);
``confidence`` is ``1 - chaos`` from charset-normalizer, 1.0 for UTF-8 and BOMs.

Usage::

    from lmref.data.encodings import DecodeConfig, decode_bytes

    d = decode_bytes("中文文本，数据准备".encode("gbk"))
    d.text, d.encoding, d.confidence, d.how        # ('中文文本，数据准备', 'gb18030', 1.0, 'detected')
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")  # one per byte that was not valid UTF-8
_NON_ASCII = bytes(range(128, 256))
ON_DECODE_ERROR = ("replace", "drop", "skip", "raise")

# Preference order on ties; Latin-1 is covered by cp1252 (a superset on printable bytes).
CANDIDATES = (
    "gb18030",
    "big5",
    "shift_jis",
    "euc_jp",
    "euc_kr",
    "cp1252",
    "cp1251",
    "utf_16_le",  # last: on short CJK text any even byte count is "valid" UTF-16
    "utf_16_be",
)
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf_32"),
    (codecs.BOM_UTF32_BE, "utf_32"),
    (codecs.BOM_UTF8, "utf_8_sig"),
    (codecs.BOM_UTF16_LE, "utf_16"),
    (codecs.BOM_UTF16_BE, "utf_16"),
)


@dataclass
class DecodeConfig:
    """``encoding``: ``"auto"`` (detect) or a codec name; ``"utf-8"`` is the strict path (bad bytes
    by ``on_decode_error``, NUL bytes mean binary). ``candidates``: what detection may answer."""

    encoding: str = "auto"
    candidates: tuple[str, ...] = CANDIDATES
    fix_mojibake: bool = True
    on_decode_error: str = "replace"

    def __post_init__(self) -> None:
        if self.on_decode_error not in ON_DECODE_ERROR:
            raise ValueError(
                f"on_decode_error must be replace|drop|skip|raise, got {self.on_decode_error!r}"
            )
        if self.encoding != "auto":
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(f"unknown encoding {self.encoding!r} (or 'auto')") from None


@dataclass(frozen=True)
class Decoded:
    """One file's text (``None`` when skipped) and how it was read.

    ``how``: ``utf-8``, ``bom``, ``detected``, ``declared`` (``DecodeConfig.encoding`` named a
    codec), ``utf-8-damaged`` (bad bytes by policy), ``binary`` or ``undecodable``.
    """

    text: str | None
    encoding: str | None
    confidence: float
    how: str
    undecodable_bytes: int = 0
    mojibake_fixed: bool = False


def decode_utf8(raw: bytes, on_decode_error: str) -> tuple[str | None, int]:
    """Decode UTF-8; return (text or None when the file is skipped, number of undecodable bytes).

    ``surrogateescape`` maps each bad byte to one lone surrogate, so the bytes can be counted
    exactly in linear time before they are replaced or dropped.
    """
    text = raw.decode("utf-8", errors="surrogateescape")
    bad = len(_SURROGATE_ESCAPE.findall(text))
    if bad == 0:
        return text, 0
    if on_decode_error == "raise":
        raise UnicodeDecodeError("utf-8", raw, 0, len(raw), f"{bad} undecodable bytes")
    if on_decode_error == "skip":
        return None, bad
    return _SURROGATE_ESCAPE.sub("\ufffd" if on_decode_error == "replace" else "", text), bad


def _looks_like_utf16(raw: bytes) -> bool:
    """NUL bytes on one parity only: ASCII-range UTF-16 without a BOM (binary formats scatter
    NULs on both)."""
    even, odd = raw[0::2].count(0), raw[1::2].count(0)
    half = len(raw) // 2
    return half > 0 and max(even, odd) >= 0.2 * half and min(even, odd) <= 0.01 * half


def _fix(text: str, config: DecodeConfig) -> tuple[str, bool]:
    if not config.fix_mojibake or text.isascii():
        return text, False
    import ftfy

    fixed = ftfy.fix_encoding(text)
    return fixed, fixed != text


def _detect(raw: bytes, candidates: tuple[str, ...]) -> Decoded:
    from charset_normalizer import from_bytes

    matches = list(from_bytes(raw, cp_isolation=list(candidates)))
    if not matches:
        return Decoded(None, None, 0.0, "undecodable")
    rank = {c: i for i, c in enumerate(candidates)}
    best = min(
        matches, key=lambda m: (m.chaos, -m.coherence, rank.get(m.encoding, len(candidates)))
    )
    return Decoded(str(best), best.encoding, round(1.0 - best.chaos, 3), "detected")


def decode_bytes(raw: bytes, config: DecodeConfig | None = None) -> Decoded:
    """Decode one file's bytes by the rules of the module docstring. Raises
    ``UnicodeDecodeError`` only for ``on_decode_error="raise"`` (damaged UTF-8 or undecodable)."""
    config = config or DecodeConfig()
    if config.encoding != "auto" and codecs.lookup(config.encoding).name != "utf-8":
        try:
            return Decoded(raw.decode(config.encoding), config.encoding, 1.0, "declared")
        except UnicodeDecodeError:
            if config.on_decode_error == "raise":
                raise
            return Decoded(None, config.encoding, 0.0, "undecodable")
    auto = config.encoding == "auto"
    if auto:
        for bom, codec in _BOMS:
            if raw.startswith(bom):
                try:
                    return Decoded(raw.decode(codec), codec, 1.0, "bom")
                except UnicodeDecodeError:
                    break  # a BOM followed by something else: let the rules below decide
    if b"\x00" in raw[:8192]:
        # CJK UTF-16 has few NULs (U+8A00 is 00 8A): long enough files go to detection too,
        # which refuses binary formats; a short one with NULs on both parities is binary.
        if not (auto and (len(raw) >= 64 or _looks_like_utf16(raw[:8192]))):
            return Decoded(None, None, 0.0, "binary")
        decoded = _detect(raw, ("utf_16_le", "utf_16_be"))
        return decoded if decoded.text is not None else Decoded(None, None, 0.0, "binary")
    try:
        text, fixed = _fix(raw.decode("utf-8"), config)
        return Decoded(text, "utf_8", 1.0, "utf-8", mojibake_fixed=fixed)
    except UnicodeDecodeError:
        pass
    # Mostly valid multi-byte UTF-8 with a few bad bytes (at most 10% of the non-ASCII ones) is
    # a damaged UTF-8 file; in legacy text (GBK, cp1252) nearly every non-ASCII byte is invalid
    # UTF-8, and valid-looking pairs occur only by chance.
    bad = len(_SURROGATE_ESCAPE.findall(raw.decode("utf-8", errors="surrogateescape")))
    non_ascii = len(raw) - len(raw.translate(None, _NON_ASCII))
    if not auto or bad <= 0.1 * non_ascii:
        text, bad = decode_utf8(raw, config.on_decode_error)
        return Decoded(text, "utf_8", 1.0, "utf-8-damaged", undecodable_bytes=bad)
    decoded = _detect(raw, config.candidates)
    if decoded.text is None and config.on_decode_error == "raise":
        raise UnicodeDecodeError("auto", raw, 0, len(raw), "no candidate encoding fits")
    return decoded
