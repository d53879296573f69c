"""Units of text for languages that write no spaces: what a "word" is when counting, shingling or matching n-grams.

Chinese and Japanese put no spaces between words, so ``text.split()`` turns a Chinese paragraph
into one "word": a word-count filter drops it and word shingles or n-grams see nothing to
compare. Every step that counts or compares text therefore goes through ``text_units``: each
CJK character (Han ideographs and kana) is a unit of its own, and any other run of
non-space characters is one unit as ``str.split`` makes it, so English text counts exactly as
before. Segmenting Chinese into words (jieba and the like) would need a dictionary; one
character per unit is what GPT-3-style decontamination and CJK near-dedup use, and needs none.

Usage::

    from lmref.data.language import text_units, cjk_fraction

    text_units("Hello, world")        # ['Hello,', 'world']
    text_units("你好，世界 ok")          # ['你', '好', '，', '世', '界', 'ok']
    cjk_fraction("你好 world")         # 0.2857... (2 of 7 non-space characters)
"""

from __future__ import annotations

import re

# Han (CJK Unified Ideographs, extension A, compatibility, extensions B-F on plane 2), kana, and
# the CJK symbols and full-width forms blocks (。，、「」！？ and the like): each is one unit.
# Hangul is left out on purpose: Korean separates words with spaces.
_CJK_CHARS = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_UNIT = re.compile(f"[{_CJK_CHARS}]|[^\\s{_CJK_CHARS}]+")


def text_units(text: str) -> list[str]:
    """Words of spaced scripts and single CJK characters, in order (see the module docstring)."""
    return _UNIT.findall(text)


def cjk_fraction(text: str) -> float:
    """The fraction of non-space characters that are CJK (0.0 for empty or all-space text)."""
    visible = len(text) - sum(ch.isspace() for ch in text)
    return len(_CJK.findall(text)) / visible if visible else 0.0
