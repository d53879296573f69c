"""Units of text for languages that write no spaces: what a "word" is when counting, shingling or matching n-grams.

Chinese and Japanese put no spaces between words, so ``text.split()`` turns a Chinese paragraph
into one "word": a word-count filter drops it and word shingles or n-grams see nothing to
compare. Every step that counts or compares text therefore goes through ``text_units``: each
CJK character (Han ideographs and kana) is a unit of its own, and any other run of
non-space characters is one unit as ``str.split`` makes it, so English text counts exactly as
before. Segmenting Chinese into words (jieba and the like) would need a dictionary; one
character per unit is what GPT-3-style decontamination and CJK near-dedup use, and needs none.

The language of each document is detected once, after loading, with ``lingua`` (a detector
made for short and mixed texts, restricted to a stated set of languages) and kept on
``Document.language`` (ISO 639-1, ``"und"`` when undetermined) so every later step counts its
documents per language. NFKC folds Chinese full-width punctuation (，！（）：；？) into ASCII:
``normalize_keeping_cjk_punctuation`` applies the form but keeps that punctuation where it
stands next to Han or kana.

Usage::

    from lmref.data.language import text_units, cjk_fraction, detect_languages, language_counts

    docs, stats = detect_languages(docs)   # Document.language = "en", "zh", ...; stats["languages"]
    language_counts(docs)                  # {"en": 9000, "zh": 5000}

    text_units("Hello, world")        # ['Hello,', 'world']
    text_units("你好，世界 ok")          # ['你', '好', '，', '世', '界', 'ok']
    cjk_fraction("你好 world")         # 0.2857... (2 of 7 non-space characters)
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmref.data.sources import Document

# Han (CJK Unified Ideographs, extension A, compatibility, extensions B-F on plane 2), kana, and
# the CJK symbols and full-width forms blocks (。，、「」！？ and the like): each is one unit.
# Hangul is left out on purpose: Korean separates words with spaces.
_CJK_CHARS = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_UNIT = re.compile(f"[{_CJK_CHARS}]|[^\\s{_CJK_CHARS}]+")
# Han and kana only (no punctuation): the letters of a CJK text, for shingles and context.
_HAN_KANA = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
# A word for comparing texts: one Han or kana character, or a run of other word characters
# (what ``\w+`` gives on text without CJK, so English shingles are unchanged).
_WORD = re.compile(f"[{_HAN_KANA}]|(?:(?![{_HAN_KANA}])\\w)+")
# Full-width punctuation NFKC would fold to ASCII (！＂＃…／ ：；＜＝＞？＠ ［＼］＾＿｀ ｛｜｝～),
# kept when a Han or kana character stands on either side. Full-width letters and digits (Ａ１)
# are still folded: they are the compatibility variants NFKC is for.
_FW_PUNCT = "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff5e"
_ANY_FW_PUNCT = re.compile(f"[{_FW_PUNCT}]")
_CJK_PUNCT = re.compile(f"(?<=[{_HAN_KANA}])[{_FW_PUNCT}]+|[{_FW_PUNCT}]+(?=[{_HAN_KANA}])")
DEFAULT_LANGUAGES = ("english", "chinese", "japanese", "french", "german", "spanish", "russian")
UNDETERMINED = "und"  # BCP 47's code for a language that could not be determined


def text_units(text: str) -> list[str]:
    """Words of spaced scripts and single CJK characters, in order (see the module docstring)."""
    return _UNIT.findall(text)


def word_units(text: str) -> list[str]:
    """Words to compare texts by (shingles, n-grams): single Han/kana characters, else ``\\w+`` runs."""
    return _WORD.findall(text)


def normalize_keeping_cjk_punctuation(text: str, form: str = "NFKC") -> tuple[str, int]:
    """``unicodedata.normalize(form, text)`` except full-width punctuation beside Han or kana.

    In Chinese and Japanese, ，！（）：；？ are the standard punctuation, not compatibility
    variants: folding them to ASCII makes training text unlike what users type. Elsewhere
    (full-width ``！`` after Latin letters) NFKC folds as usual. Returns (text, characters kept).
    """
    if not _ANY_FW_PUNCT.search(text):
        return unicodedata.normalize(form, text), 0  # no full-width punctuation (most documents)
    pieces, kept = _CJK_PUNCT.split(text), _CJK_PUNCT.findall(text)
    out = [unicodedata.normalize(form, pieces[0])]
    for punct, piece in zip(kept, pieces[1:]):
        out += [punct, unicodedata.normalize(form, piece)]
    return "".join(out), sum(map(len, kept))


@lru_cache(maxsize=4)
def language_detector(languages: Sequence[str] = DEFAULT_LANGUAGES, low_accuracy: bool = False):
    """A ``lingua`` detector for ``languages`` (names as in ``lingua.Language``), built once.

    High accuracy is the default: on 1,983 documents of the stdlib + fortunes-zh mix (AMD EPYC,
    benchmarks/data_chinese.py) it ran 7.8k docs/s one by one (8.3k in parallel), low-accuracy
    mode 10.8k: not much faster, and it disagreed on 3.6 % of them, mostly short English
    docstrings it called French, German or Spanish.
    """
    from lingua import Language, LanguageDetectorBuilder

    known = {language.name: language for language in Language.all()}
    unknown = [n for n in languages if n.upper() not in known]
    if unknown or len(languages) < 2:
        raise ValueError(
            f"languages must name at least two lingua languages, got {list(languages)} "
            f"(unknown: {unknown}); e.g. {list(DEFAULT_LANGUAGES)}"
        )
    builder = LanguageDetectorBuilder.from_languages(*(known[n.upper()] for n in languages))
    return (builder.with_low_accuracy_mode() if low_accuracy else builder).build()


def detect_languages(
    docs: Sequence[Document],
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    low_accuracy: bool = False,
) -> tuple[list[Document], dict]:
    """Set ``Document.language`` (ISO 639-1 code, ``"und"`` if undetermined); count per language."""
    detector = language_detector(tuple(languages), low_accuracy)
    found = detector.detect_languages_in_parallel_of([d.text for d in docs])
    out = [
        replace(d, language=lang.iso_code_639_1.name.lower() if lang else UNDETERMINED)
        for d, lang in zip(docs, found)
    ]
    return out, {
        "docs": len(out),
        "languages": language_counts(out),
        "candidates": list(languages),
        "low_accuracy": low_accuracy,
    }


def language_counts(docs: Sequence[Document]) -> dict[str, int]:
    """Documents per language, most frequent first (``"und"`` for none or undetermined)."""
    counts = Counter(getattr(d, "language", None) or UNDETERMINED for d in docs)
    return dict(counts.most_common())


def texts_by_language(docs: Sequence[Document]) -> dict[str, list[str]]:
    """The texts of ``docs`` grouped by ``Document.language``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for d in docs:
        groups[getattr(d, "language", None) or UNDETERMINED].append(d.text)
    return dict(groups)


def cjk_fraction(text: str) -> float:
    """The fraction of non-space characters that are CJK (0.0 for empty or all-space text)."""
    visible = sum(map(len, text.split()))  # str.split drops exactly the str.isspace characters
    return len(_CJK.findall(text)) / visible if visible else 0.0
