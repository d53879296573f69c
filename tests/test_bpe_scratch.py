"""Tests for lmref.data.bpe_scratch: the from-scratch merge loop against tokenizers' BpeTrainer."""

from __future__ import annotations

import random

import pytest

from lmref.data.bpe_scratch import (
    apply_merges,
    learn_merges,
    library_merges,
    merge_pair,
    word_counts,
)
from lmref.data.tokens import train_tokenizer

pytestmark = pytest.mark.unit

WORDS = (
    "return the value of the file list string name type object error data line path time key "
    "module class text word code node user host port mode size queue stack lock event task"
).split()


def _texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        + f" on {rng.randint(1950, 2049)}-{rng.randint(1, 12):02d}."
        for _ in range(n)
    ]


def test_merges_equal_the_tokenizers_trainer_on_the_same_text():
    texts = _texts()
    ours = learn_merges(word_counts(texts), num_merges=120)
    assert len(ours) == 120
    assert ours == library_merges(texts, num_merges=120)


def test_min_frequency_stops_like_the_library():
    texts = ["the cat sat", "the dog ran", "a bird flew over the hill"]
    ours = learn_merges(word_counts(texts), num_merges=50, min_frequency=2)
    assert ours == library_merges(texts, num_merges=50, min_frequency=2)
    assert len(ours) < 50  # only pairs that occur twice are merged


def test_encoding_with_the_merges_equals_the_library_tokenizer():
    texts = _texts()
    merges = learn_merges(word_counts(texts), num_merges=120)
    tokenizer, _ = train_tokenizer(texts, vocab_size=2 + 256 + 120)
    sample = "return the module name of the host port on 2031-07-14."
    words = [w for w, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(sample)]
    assert [t for w in words for t in apply_merges(w, merges)] == tokenizer.tokenize(sample)


def test_digits_are_words_of_their_own():
    # Digits are split off one by one first, so the space before a number is a word alone.
    counts = word_counts(["in 2024"])
    assert counts == {("i", "n"): 1, ("Ġ",): 1, ("2",): 2, ("0",): 1, ("4",): 1}


def test_merge_pair_joins_left_to_right_without_overlap():
    assert merge_pair(("a", "a", "a"), ("a", "a")) == ("aa", "a")
    assert merge_pair(("a", "b", "a", "b"), ("a", "b")) == ("ab", "ab")
    assert merge_pair(("a", "b"), ("b", "a")) == ("a", "b")


def test_ties_go_to_the_pair_of_smallest_ids():
    # ("a","b") and ("c","d") occur equally often: "a" < "c", so ("a","b") is merged first.
    assert learn_merges({("c", "d"): 3, ("a", "b"): 3}, num_merges=2) == [("a", "b"), ("c", "d")]
