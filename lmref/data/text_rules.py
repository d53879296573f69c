"""The per-document rules of cleaning, filtering and near dedup, written to run at corpus scale.

``lmref.data.clean`` (in memory) and ``lmref.data.stream`` (on disk) call these on every
document, so they are where the time goes: a profile of the stream on 5 MB showed per-character
Python loops (control characters, the filter's symbol and CJK ratios, ``any(ch.isalpha())``
per word) and per-shingle function calls taking most of it. Here each rule is one compiled
regex or one C-level string method over the whole text, with results identical to the loops
they replace (tests/test_text_rules.py checks both against per-character definitions):

- ``remove_control_chars``: Cc and Cf characters except ``\\n`` and ``\\t``;
- ``normalize_whitespace``: tabs to 4 columns, other spaces to " ", no trailing spaces, one
  space between words, at most one blank line;
- ``quality_reason`` with ``FilterConfig``: the C4 / Gopher-style rule that failed, or None;
- ``shingle_hashes``: the 32-bit SHA-1 of each distinct word n-gram, what datasketch's default
  ``sha1_hash32`` makes of ``_shingles``, for ``MinHash(hashfunc=int)``.

The character classes Python's ``re`` lacks (Unicode categories Cc/Cf, ``str.isalpha``) are
built once per process from the running interpreter's own Unicode tables (about 0.5 s), so they
agree with ``unicodedata`` and ``str`` methods by construction.

Usage::

    from lmref.data.text_rules import FilterConfig, quality_reason, shingle_hashes

    quality_reason("a short text", FilterConfig())   # "too_short"
    MinHash(num_perm=128, hashfunc=int).update_batch(shingle_hashes(text, 5))
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from lmref.data.language import cjk_fraction, text_units, word_units


def _char_class(chars: list[int]) -> str:
    """A regex matching one of these code points. ``re`` compiles a class within the BMP to a
    bitmap, but one holding a character above U+FFFF to a list of ranges it scans one by one
    (hundreds here), so the astral part is a second class tried only for astral characters."""
    bmp, astral = [c for c in chars if c <= 0xFFFF], [c for c in chars if c > 0xFFFF]
    return f"(?:[{_ranges(bmp)}]|(?=[\U00010000-\U0010ffff])[{_ranges(astral)}])"


def _ranges(chars: list[int]) -> str:
    """A regex character-class body for these code points, as ranges."""
    out, i = [], 0
    while i < len(chars):
        j = i
        while j + 1 < len(chars) and chars[j + 1] == chars[j] + 1:
            j += 1
        lo, hi = re.escape(chr(chars[i])), re.escape(chr(chars[j]))
        out.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "".join(out)


@lru_cache(maxsize=1)
def _classes() -> tuple[re.Pattern, re.Pattern]:
    # One pass over every code point, at first use rather than on import (no import cost)
    control, alpha = [], []
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        if unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\n\t":
            control.append(cp)
        if ch.isalpha():
            alpha.append(cp)
    # A line (one word per line, see quality_reason) holding at least one letter
    alpha_word = re.compile(f"^[^\\n]*?{_char_class(alpha)}", re.MULTILINE)
    return re.compile(f"{_char_class(control)}+"), alpha_word


def warm_up() -> None:
    """Build the Unicode classes now (once per process; otherwise at the first document)."""
    _classes()


def remove_control_chars(text: str) -> tuple[str, int]:
    """Text without Cc (C0/C1 controls) and Cf (zero-width spaces, BOMs, soft hyphens) characters,
    ``\\n`` and ``\\t`` kept; and how many were removed."""
    if text.replace("\n", " ").replace("\t", " ").isprintable():
        return text, 0  # Cc and Cf are never printable: nothing to remove (most documents)
    kept = _classes()[0].sub("", text)
    return kept, len(text) - len(kept)


# Unicode whitespace except the line break (and the space itself, which it would become)
_NON_NEWLINE_SPACE = re.compile(r"[^\S\n ]")
_TRAILING_SPACES = re.compile(r" +$", re.MULTILINE)
_EXTRA_SPACES = re.compile(r"(?<=\S) {2,}")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Tabs to 4 columns, other whitespace but ``\\n`` to a space, trailing spaces removed, runs of
    spaces after a word to one, three or more line breaks to two, the ends stripped.

    ``str.expandtabs`` restarts its columns at every ``\\n`` and ``\\r`` (``clean_text`` has
    turned ``\\r`` into ``\\n`` before), so one call on the text equals one per line."""
    if "\t" in text:
        text = text.expandtabs(4)
    text = _TRAILING_SPACES.sub("", _NON_NEWLINE_SPACE.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", _EXTRA_SPACES.sub(" ", text)).strip()


# ----------------------------------------------------------------------------------------------
# Quality filters
# ----------------------------------------------------------------------------------------------


@dataclass
class FilterConfig:
    """Heuristic quality filters in the spirit of C4 / Gopher rules, tuned for docstrings.

    symbol ratio = characters that are neither letters, digits nor whitespace, over non-whitespace
    characters (tables, ASCII art, code); alpha-word ratio = words containing a letter over words.
    Words are ``text_units``: one per CJK character (no spaces to split on), else space-separated.
    """

    min_chars: int = 60
    # For mostly-CJK text: a character carries what 4-5 English ones do (SmolLM2's tokenizer, 0.83
    # vs 3.93 chars/token, benchmarks/results/data_chinese-cpu.json); 60 dropped most Chinese.
    min_cjk_chars: int = 20
    max_chars: int = 20_000
    min_words: int = 8
    max_symbol_ratio: float = 0.25
    # For mostly-CJK text: Chinese puts a full-width mark every 5-7 characters, each a unit, so its
    # ratio runs higher (fortunes-zh's prose: median 0.23, 75th percentile 0.30); 0.25 dropped 40%.
    max_cjk_symbol_ratio: float = 0.35
    min_alpha_word_ratio: float = 0.6
    max_replacement_ratio: float = 0.01  # U+FFFD left by undecodable bytes


# Neither str.isalnum() nor the line break: re's \w is str.isalnum() plus "_"
_SYMBOL = re.compile(r"[^\w\n]|_")
# A one-character word at or above U+3000 that is not alphanumeric: CJK punctuation standing
# alone, which the alpha-word ratio leaves out (see quality_reason)
_LONE_CJK_PUNCT = re.compile(r"^[^\x00-\u2fff\w]$", re.MULTILINE)


def quality_reason(text: str, c: FilterConfig) -> str | None:
    """The first rule of ``c`` that ``text`` fails (``"too_short"``, ``"symbol_ratio"``, ...), or
    None when it passes them all."""
    cjk = cjk_fraction(text) >= 0.5
    if len(text) < (c.min_cjk_chars if cjk else c.min_chars):
        return "too_short"
    if len(text) > c.max_chars:
        return "too_long"
    words = text_units(text)
    if len(words) < c.min_words:
        return "too_few_words"
    # One word per line: no word holds a line break (words are runs of non-space characters)
    lines = "\n".join(words)
    non_space = len(lines) - (len(words) - 1)
    if len(_SYMBOL.findall(lines)) / non_space > (
        c.max_cjk_symbol_ratio if cjk else c.max_symbol_ratio
    ):
        return "symbol_ratio"
    # CJK punctuation is a unit of its own while "word," carries its comma: leave it out, as a
    # spaced script's punctuation is, or one ，or 。 every five characters would count as words
    # without a letter. Han and kana are letters (str.isalpha), so Chinese words count as alpha.
    # (The words left out hold no letter, so only the denominator changes.)
    counted = len(words) - len(_LONE_CJK_PUNCT.findall(lines)) or len(words)
    if len(_classes()[1].findall(lines)) / counted < c.min_alpha_word_ratio:
        return "alpha_word_ratio"
    if text.count("\ufffd") / len(text) > c.max_replacement_ratio:
        return "replacement_chars"
    return None


# ----------------------------------------------------------------------------------------------
# Shingles for MinHash
# ----------------------------------------------------------------------------------------------


def _grams(text: str, size: int) -> set[str]:
    # Words of spaced scripts, single characters of Chinese and Japanese (a Chinese paragraph is
    # one \w+ run between punctuation): shingles are character n-grams there.
    words = word_units(text.lower())
    if len(words) <= size:
        return {" ".join(words)}
    return set(map(" ".join, zip(*(words[i:] for i in range(size)))))


def shingles(text: str, size: int) -> list[bytes]:
    """The distinct word ``size``-grams of ``text`` as UTF-8 bytes (datasketch's input)."""
    return [g.encode() for g in _grams(text, size)]


def shingle_hashes(text: str, size: int) -> list[int]:
    """``datasketch.hashfunc.sha1_hash32`` of each of :func:`shingles`, without a Python call per
    shingle: feed them to ``MinHash(hashfunc=int)`` for the same signature."""
    sha1, from_bytes = hashlib.sha1, int.from_bytes
    return [from_bytes(sha1(g.encode()).digest()[:4], "little") for g in _grams(text, size)]
