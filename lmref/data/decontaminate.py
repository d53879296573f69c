"""Decontamination: find evaluation items whose n-grams occur in the training data, and remove the
training documents that hold them.

An item seen in training measures memory, not skill. As in GPT-3 (appendix C), each item is cut
into 13-grams and any training document that contains one of them is contaminated. Units are
those of ``lmref.data.language.text_units`` (a word in spaced scripts, one unit per CJK
character, so Chinese text has n-grams too), lower-cased and reduced to their letters and digits
(``\\w+`` runs), so case, punctuation and spacing do not hide a copy; on text without CJK this is
exactly the ``\\w+`` words of ``lmref.evaluation.contamination``, which imports its n-gram core
from here. An item shorter than n units is matched as a whole (one n-gram of all its units);
items shorter than ``min_units`` are not checked at all (counted): a 3-word item matches by
chance.

Removal: the whole training document is dropped, not the overlapping span cut out (GPT-3 cut
the span and 200 characters around it). Cutting leaves text with holes that reads as broken
prose and still carries the rest of a copied item; the course's documents are short (docstrings,
paragraphs), so a contaminated one is mostly the copy. The report counts the characters lost.

Memory: the *evaluation* side is indexed (a dict of its n-grams) and the training side streamed
document by document, so memory grows with the evaluation set, never with the corpus.

Usage::

    from lmref.data.decontaminate import decontaminate

    kept, stats = decontaminate(splits["train"], [d.text for d in splits["test"]])
    stats["items_hit"], stats["docs_removed"]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from lmref.data.language import text_units

if TYPE_CHECKING:
    from lmref.data.sources import Document

DEFAULT_N = 13
WORD = re.compile(r"\w+")
Ngram = tuple[str, ...]


def ngram_units(text: str) -> list[str]:
    """The units n-grams are made of: ``text_units`` lower-cased, as ``\\w+`` runs (module doc)."""
    lowered = text.lower()
    if lowered.isascii():  # no CJK: text_units then \w+ is \w+ on the whole text, only faster
        return WORD.findall(lowered)
    return [w for unit in text_units(lowered) for w in WORD.findall(unit)]


def item_ngrams(text: str, n: int = DEFAULT_N) -> set[Ngram]:
    """The n-grams of ``text``; a text of fewer than n units gives one n-gram of all its units,
    and an empty text none."""
    units = ngram_units(text)
    if len(units) < n:
        return {tuple(units)} if units else set()
    return {tuple(units[i : i + n]) for i in range(len(units) - n + 1)}


class NgramIndex:
    """The n-grams of the evaluation items, and which items hold each; a training text is
    scanned against it (every length any item's n-grams have)."""

    def __init__(self, item_grams: Sequence[set[Ngram]]):
        self.items: dict[Ngram, list[int]] = {}
        for index, grams in enumerate(item_grams):
            for gram in grams:
                self.items.setdefault(gram, []).append(index)
        self.lengths = sorted({len(g) for g in self.items})

    def find(self, text: str) -> set[Ngram]:
        """The indexed n-grams that occur in ``text``."""
        units = ngram_units(text)
        found = set()
        for k in self.lengths:
            for i in range(len(units) - k + 1):
                gram = tuple(units[i : i + k])
                if gram in self.items:
                    found.add(gram)
        return found


def seen_ngrams(item_grams: Sequence[set[Ngram]], training_texts: Iterable[str]) -> set[Ngram]:
    """Which of the items' n-grams occur anywhere in ``training_texts`` (streamed once)."""
    index = NgramIndex(item_grams)
    seen: set[Ngram] = set()
    for text in training_texts:
        seen |= index.find(text)
    return seen


def decontaminate(
    train_docs: Sequence[Document],
    eval_texts: Sequence[str],
    n: int = DEFAULT_N,
    min_units: int = 8,
) -> tuple[list[Document], dict]:
    """Drop every training document that contains an n-gram of an evaluation item (an item shorter
    than n: the whole item; shorter than ``min_units``: not checked). Returns the kept documents
    and the report: items checked and hit, documents and characters removed, a few examples."""
    if n < 1 or min_units < 1:
        raise ValueError(f"need n >= 1 and min_units >= 1, got {n=}, {min_units=}")
    item_grams = [item_ngrams(t, n) for t in eval_texts]
    checked = [g if len(next(iter(g), ())) >= min_units else set() for g in item_grams]
    index = NgramIndex(checked)
    kept: list[Document] = []
    items_hit: set[int] = set()
    removed, chars_removed, examples = 0, 0, []
    for doc in train_docs:
        found = index.find(doc.text)
        if not found:
            kept.append(doc)
            continue
        hit = {i for gram in found for i in index.items[gram]}
        items_hit |= hit
        removed += 1
        chars_removed += len(doc.text)
        if len(examples) < 5:
            examples.append({"source": doc.source, "items": sorted(hit)[:5]})
    return kept, {
        "n": n,
        "items": len(eval_texts),
        "items_checked": sum(bool(g) for g in checked),
        "items_too_short": sum(bool(g) and not c for g, c in zip(item_grams, checked)),
        "items_hit": len(items_hit),
        "docs_in": len(train_docs),
        "docs_removed": removed,
        "chars_removed": chars_removed,
        "examples": examples,
    }
