"""Byte-pair encoding from scratch: the merge loop of ``tokenizers``' BPE trainer in plain Python.

BPE (Sennrich et al., 2016) starts from single symbols (here the 256 byte-level characters of
GPT-2, so any text is covered), counts every adjacent pair of symbols over the words of the corpus
(each word weighted by how often it occurs), merges the most frequent pair into a new symbol
everywhere, and repeats. The list of merges, in order, *is* the tokenizer: encoding a word applies
them by rank. ``learn_merges`` mirrors ``tokenizers.trainers.BpeTrainer`` exactly, tie-break
included (equal counts: the pair of smallest ids, ids being the alphabet in code point order and
then the new symbols in the order they were made) and ``min_frequency`` (stop when the best pair
occurs fewer times), so on the same words it learns the same merges (``tests/test_bpe_scratch.py``).

Splitting text into words (pre-tokenization) is not the lesson here: ``word_counts`` uses the
pre-tokenizer of ``lmref.data.tokens.train_tokenizer`` (digits one by one, then GPT-2's regex and
byte-to-character map), and ``library_merges`` trains that very tokenizer for the comparison.
Quadratic and slow (every merge recounts every pair): a lesson, not a trainer for real corpora.

Usage::

    from lmref.data.bpe_scratch import apply_merges, learn_merges, library_merges, word_counts

    words = word_counts(texts)                      # {("R", "e", "t", ...): 12, ...}
    merges = learn_merges(words, num_merges=200)    # [("Ġ", "t"), ("h", "e"), ...]
    merges == library_merges(texts, num_merges=200) # True: tokenizers' trainer, same text
    apply_merges("Ġreturn", merges)                 # e.g. ["Ġreturn"]
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping

from lmref.data.tokens import EOS_TOKEN, PAD_TOKEN, train_tokenizer

Pair = tuple[str, str]


def byte_level_pre_tokenizer():
    """The pre-tokenizer of :func:`lmref.data.tokens.train_tokenizer`: digits one by one, then
    GPT-2's regex split and its map of the 256 bytes to printable characters (space -> ``Ġ``)."""
    from tokenizers import pre_tokenizers

    digits = pre_tokenizers.Digits(individual_digits=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([digits, byte_level])


def byte_alphabet() -> set[str]:
    """The 256 characters that stand for the 256 byte values."""
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def word_counts(texts: Iterable[str]) -> Counter[tuple[str, ...]]:
    """Each pre-tokenized word as a tuple of its byte-level characters, with its count."""
    pre_tokenizer = byte_level_pre_tokenizer()
    counts = Counter(piece for text in texts for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    return Counter({tuple(word): n for word, n in counts.items()})


def merge_pair(word: tuple[str, ...], pair: Pair) -> tuple[str, ...]:
    """``word`` with every occurrence of ``pair`` joined, left to right, never overlapping."""
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(
    words: Mapping[tuple[str, ...], int], num_merges: int, min_frequency: int = 2
) -> list[Pair]:
    """The first ``num_merges`` merges BPE learns from ``words`` (fewer when no pair is left
    that occurs ``min_frequency`` times). Ties go to the pair of smallest ids, as in tokenizers."""
    ids = {c: i for i, c in enumerate(sorted(byte_alphabet() | {c for w in words for c in w}))}
    merges: list[Pair] = []
    while len(merges) < num_merges:
        pairs: Counter[Pair] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -ids[p[0]], -ids[p[1]]))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        ids.setdefault(best[0] + best[1], len(ids))
        words = {merge_pair(word, best): n for word, n in words.items()}
    return merges


def apply_merges(word: str, merges: list[Pair]) -> list[str]:
    """Encode one pre-tokenized word: repeatedly join the present pair that was learnt first."""
    rank = {pair: r for r, pair in enumerate(merges)}
    symbols = tuple(word)
    while len(symbols) > 1:
        pair = min(zip(symbols, symbols[1:]), key=lambda p: rank.get(p, len(rank)))
        if pair not in rank:
            break
        symbols = merge_pair(symbols, pair)
    return list(symbols)


def library_merges(texts: Iterable[str], num_merges: int, min_frequency: int = 2) -> list[Pair]:
    """The first ``num_merges`` merges of the course tokenizer (``train_tokenizer``, i.e.
    ``tokenizers``' BpeTrainer) trained on ``texts``: the reference for :func:`learn_merges`."""
    specials = (EOS_TOKEN, PAD_TOKEN)
    vocab_size = len(specials) + len(byte_alphabet()) + num_merges
    tokenizer, _ = train_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    # Serialized as ["a", "b"] pairs (tokenizers >= 0.20) or as "a b" strings (older versions).
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges][:num_merges]
