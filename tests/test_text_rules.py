"""lmref.data.text_rules gives what the per-character definitions give: the Unicode classes over
every code point, the quality rule against the loops it replaced, shingle hashes against
datasketch's own hash function and signature."""

from __future__ import annotations

import random
import sys
import unicodedata

import pytest

from lmref.data.language import cjk_fraction, text_units
from lmref.data.text_rules import (
    FilterConfig,
    _classes,
    normalize_whitespace,
    quality_reason,
    remove_control_chars,
    shingle_hashes,
    shingles,
)

pytestmark = pytest.mark.unit


def test_unicode_classes_match_unicodedata_on_every_code_point():
    control, alpha_word = _classes()
    every = [chr(cp) for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF]
    text = "".join(every)
    kept, removed = remove_control_chars(text)
    expected = "".join(
        c for c in every if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf")
    )
    assert kept == expected and removed == len(text) - len(expected)
    letters = [c for c in every if c != "\n"]
    found = {m[-1] for m in alpha_word.findall("\n".join(letters))}
    assert found == {c for c in letters if c.isalpha()}


def _reference_reason(text: str, c: FilterConfig) -> str | None:
    # The per-character rule as it was before text_rules (lmref.data.clean, #29)
    visible = len(text) - sum(ch.isspace() for ch in text)
    cjk = cjk_fraction(text) if visible else 0.0
    if len(text) < (c.min_cjk_chars if cjk >= 0.5 else c.min_chars):
        return "too_short"
    if len(text) > c.max_chars:
        return "too_long"
    words = text_units(text)
    if len(words) < c.min_words:
        return "too_few_words"
    limit = c.max_cjk_symbol_ratio if cjk >= 0.5 else c.max_symbol_ratio
    if sum(not ch.isalnum() for w in words for ch in w) / sum(map(len, words)) > limit:
        return "symbol_ratio"
    words = [w for w in words if len(w) > 1 or w.isalnum() or w < "\u3000"] or words
    if sum(any(ch.isalpha() for ch in w) for w in words) / len(words) < c.min_alpha_word_ratio:
        return "alpha_word_ratio"
    if text.count("\ufffd") / len(text) > c.max_replacement_ratio:
        return "replacement_chars"
    return None


def test_quality_reason_matches_the_per_character_rule():
    rng = random.Random(0)
    pool = [*"abc xyz 123 _-,.;:!?()[]{}²½Ⅻ①\t\n\u3000，。！你好世界かな\ufffd\u00a0"]
    pool += ["word ", "the ", "data ", "你好，", "==== ", ">>> "]
    config = FilterConfig(min_chars=20, min_cjk_chars=5, min_words=3)
    reasons = set()
    for _ in range(800):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 120))).strip() or "x"
        expected = _reference_reason(text, config)
        assert quality_reason(text, config) == expected, text
        reasons.add(expected)
    assert len(reasons) >= 4  # the strings reach several rules, not one


def test_whitespace_normalisation_matches_the_per_line_rule():
    import re

    def per_line(text: str) -> str:  # as lmref.data.clean did it before text_rules
        text = "\n".join(
            re.sub(r"[^\S\n]", " ", line.expandtabs(4)).rstrip() for line in text.split("\n")
        )
        return re.sub(r"\n{3,}", "\n\n", re.sub(r"(?<=\S) {2,}", " ", text)).strip()

    rng = random.Random(1)
    pool = [*"ab \t\n\u00a0\u2003\u3000\x0b\x1f", "word", "  ", "\n\n\n"]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    assert [normalize_whitespace(t) for t in texts] == [per_line(t) for t in texts]
    assert normalize_whitespace("a\tb  c \u00a0\n\n\n\n d ") == "a b c\n\n d"


def test_shingle_hashes_give_datasketchs_signature():
    from datasketch import MinHash
    from datasketch.hashfunc import sha1_hash32

    text = "The quick brown fox jumps over the lazy dog; 敏捷的棕色狐狸跳过了懒狗。" * 3
    assert sorted(shingle_hashes(text, 5)) == sorted(map(sha1_hash32, shingles(text, 5)))
    a, b = MinHash(num_perm=64, seed=1), MinHash(num_perm=64, seed=1, hashfunc=int)
    a.update_batch(shingles(text, 5))
    b.update_batch(shingle_hashes(text, 5))
    assert (a.hashvalues == b.hashvalues).all()
