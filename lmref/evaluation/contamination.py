"""Contamination check: which evaluation items (or large parts of them) occur in the training data.

An item seen in training measures memory, not skill. The check is word n-gram overlap, as in
GPT-3 (13-grams) and PaLM (8-grams): each item's text (question and answer) is cut into word
n-grams and the share of them that also occur somewhere in the training text is its overlap
ratio; an item at or above ``threshold`` is flagged. Words are lower-cased runs of letters and
digits, so punctuation, case and spacing do not hide a copy; Chinese and Japanese count one unit
per character. The n-gram core is ``lmref.data.decontaminate`` (which also removes contaminated
training documents in the data pipeline); this module reports on evaluation items.

The default n is 8, not GPT-3's 13: the course's items are short (an instruction and its answer:
10-20 words), and an item shorter than n words has no n-gram at all; 8 still makes a chance
match of ordinary prose rare. An item shorter than n is checked as one n-gram of all its words
(a whole-item match). Written here rather than with ``lm_eval.decontamination``: that module
works on the Pile-style n-gram archives it builds on disk, not on a corpus in memory.

Usage::

    from lmref.evaluation.contamination import contamination_report

    report = contamination_report(eval_items, training_texts)     # n=8, threshold=0.5
    print(report.score)                     # share of contaminated items, with its interval
    [i.text for i in report.items if i.flagged]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lmref.core.stats import Score
from lmref.data.decontaminate import item_ngrams, seen_ngrams

DEFAULT_N = 8
DEFAULT_THRESHOLD = 0.5  # half an item's n-grams seen in training: a copy, perhaps edited


def word_ngrams(text: str, n: int = DEFAULT_N) -> set[tuple[str, ...]]:
    """The n-grams of ``text`` (``lmref.data.decontaminate.item_ngrams`` with this module's n)."""
    return item_ngrams(text, n)


@dataclass(frozen=True)
class ItemOverlap:
    """One evaluation item: its n-grams, how many occur in training, and the verdict."""

    index: int
    text: str
    ngrams: int
    overlapping: int
    ratio: float
    flagged: bool


@dataclass(frozen=True)
class ContaminationReport:
    """Per item overlap and the share of flagged items as a Score (with its interval)."""

    items: tuple[ItemOverlap, ...]
    n: int
    threshold: float

    @property
    def score(self) -> Score:
        return Score(sum(i.flagged for i in self.items), len(self.items))

    @property
    def clean_indices(self) -> list[int]:
        """The items to keep for an uncontaminated evaluation."""
        return [i.index for i in self.items if not i.flagged]


def contamination_report(
    items: Sequence[str],
    training_texts: Iterable[str],
    n: int = DEFAULT_N,
    threshold: float = DEFAULT_THRESHOLD,
) -> ContaminationReport:
    """Overlap of each item's word n-grams with ``training_texts``; flagged at ``ratio >=
    threshold``. Pass an item as its full text (question and answer: a leaked answer is the
    contamination that matters)."""
    if n < 1 or not 0 < threshold <= 1:
        raise ValueError(f"need n >= 1 and 0 < threshold <= 1, got {n=}, {threshold=}")
    if not items:
        raise ValueError("no evaluation items to check")
    item_grams = [word_ngrams(text, n) for text in items]
    seen = seen_ngrams(item_grams, training_texts)  # the items indexed, the training streamed
    rows = []
    for index, (text, grams) in enumerate(zip(items, item_grams)):
        hits = sum(g in seen for g in grams)
        ratio = hits / len(grams) if grams else 0.0
        rows.append(
            ItemOverlap(index, text, len(grams), hits, ratio, bool(grams) and ratio >= threshold)
        )
    return ContaminationReport(tuple(rows), n, threshold)
