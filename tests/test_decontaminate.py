"""Tests for lmref.data.decontaminate: planted test items (English and Chinese) caught and their
training documents removed, clean data reports zero, and the shared n-gram core that
lmref.evaluation.contamination uses."""

from __future__ import annotations

import random

import pytest

from lmref.data.decontaminate import decontaminate, item_ngrams, ngram_units, seen_ngrams
from lmref.data.sources import Document

pytestmark = pytest.mark.unit

WORDS = "file list string value name type object error data line path time key module".split()
ZH_ITEM = "数据准备的第一步是检测每个文件的编码，然后把它转换成统一的格式。"


def prose(seed: int, n: int = 40) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_units_are_words_and_cjk_characters():
    assert ngram_units("Hello, World! a-b") == ["hello", "world", "a", "b"]  # \w+ runs
    assert ngram_units("编码：GBK 和 UTF-8。") == ["编", "码", "gbk", "和", "utf", "8"]
    assert item_ngrams("one two three", 13) == {("one", "two", "three")}  # whole item
    assert len(item_ngrams(ZH_ITEM, 13)) == len(ngram_units(ZH_ITEM)) - 12 > 0
    assert item_ngrams("  ", 13) == set()


def test_planted_items_are_caught_and_their_documents_removed():
    test_items = [prose(100, 30), ZH_ITEM, prose(101, 30)]
    train = [Document(prose(i), f"doc{i}") for i in range(20)]
    # an English item pasted into a document in other case and punctuation, and a Chinese one
    train[3] = Document(f"{prose(3, 10)}. {test_items[0].upper().replace(' ', ', ')}!", "doc3")
    train[7] = Document(f"前言。{ZH_ITEM[5:]}后记。", "doc7")  # most of the item: 13-grams match
    kept, stats = decontaminate(train, test_items)
    assert [d.source for d in train if d not in kept] == ["doc3", "doc7"]
    assert stats["items_hit"] == 2 and stats["docs_removed"] == 2
    assert stats["chars_removed"] == len(train[3].text) + len(train[7].text)
    assert {e["source"] for e in stats["examples"]} == {"doc3", "doc7"}


def test_clean_data_reports_zero_and_short_items_are_skipped():
    train = [Document(prose(i), f"doc{i}") for i in range(20)]
    kept, stats = decontaminate(train, [prose(200, 30), "数据准备的第一步"])
    assert kept == train and stats["items_hit"] == stats["docs_removed"] == 0
    _, stats = decontaminate(train, ["file list"], min_units=8)  # would match by chance
    assert stats["items_too_short"] == 1 and stats["items_checked"] == 0
    with pytest.raises(ValueError, match="n >= 1"):
        decontaminate(train, ["x"], n=0)


def test_seen_ngrams_streams_the_training_side():
    grams = [item_ngrams(ZH_ITEM, 8), item_ngrams(prose(5, 20), 8)]
    seen = seen_ngrams(grams, iter([f"无关 {ZH_ITEM} 无关", prose(6)]))  # any iterable, once
    assert seen == grams[0]
