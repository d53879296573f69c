"""From text to training blocks: a byte-level BPE tokenizer and packing into fixed-size blocks.

``train_tokenizer`` trains a byte-level BPE (digits split one by one) and wraps it as a
``transformers`` fast tokenizer; ``pack_blocks`` tokenizes documents, joins them with EOS and cuts
the stream into blocks of exactly ``block_size`` tokens (no padding). Each returns its result and
a dict of numbers (tokens, blocks, dropped tokens).

Usage::

    from lmref.data.tokens import pack_blocks, train_tokenizer

    tokenizer, stats = train_tokenizer(train_texts, vocab_size=4096)
    blocks, stats = pack_blocks(train_texts, tokenizer, block_size=256)
    blocks[0]["input_ids"]          # 256 token ids
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from datasets import Dataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> tuple[PreTrainedTokenizerFast, dict]:
    """Train a byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``.

    Byte level: any string encodes (no unknown token) and decodes back exactly. Digits are split
    one by one (as in Llama 1 and 2; Llama 3 groups up to three digits) so numbers share a small,
    consistent set of tokens, which is what makes arithmetic learnable. bos = eos = ``<|endoftext|>`` (GPT-2 style), pad = ``<|pad|>``.
    Returns ``(tokenizer, stats)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    n_chars = sum(len(t) for t in texts)
    return tokenizer, {
        "vocab_size": len(tokenizer),
        "requested_vocab_size": vocab_size,
        "training_docs": len(texts),
        "training_chars": n_chars,
        "training_tokens": n_tokens,
        "chars_per_token": n_chars / max(n_tokens, 1),
    }


class EmptyPackingError(ValueError):
    """:func:`pack_blocks` made no block: too few tokens for ``block_size``."""

    def __init__(self, tokens: int, block_size: int, batch_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        super().__init__(
            f"{tokens} tokens make no block of block_size={block_size} (documents are "
            f"packed {batch_size} at a time, each group's tail dropped): give more "
            "text or a smaller block_size"
        )


def pack_blocks(
    texts: Sequence[str] | Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 256,
    batch_size: int = 1000,
    text_column: str = "text",
) -> tuple[Dataset, dict]:
    """Tokenize, join documents with EOS and cut the stream into blocks of exactly ``block_size``.

    No padding: every position is a real token, so no compute is spent on pad tokens. Documents
    are concatenated within each ``datasets.map`` batch of ``batch_size`` documents and the
    incomplete tail of each batch is dropped (reported as ``dropped_tokens``).
    Returns ``(Dataset with column input_ids, stats)``; raises ``EmptyPackingError`` (a
    ``ValueError``) when the texts make no block at all.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ds = texts if isinstance(texts, Dataset) else Dataset.from_dict({text_column: list(texts)})
    eos = tokenizer.eos_token_id
    tokenized = ds.map(
        lambda batch: {
            "input_ids": [
                ids + [eos]
                for ids in tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
            ]
        },
        batched=True,
        batch_size=batch_size,
        remove_columns=ds.column_names,
        desc="tokenize",
    )
    n_tokens = sum(len(ids) for ids in tokenized["input_ids"])

    def to_blocks(batch: dict) -> dict:
        stream = [t for ids in batch["input_ids"] for t in ids]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    blocks = tokenized.map(to_blocks, batched=True, batch_size=batch_size, desc="pack")
    n_blocks = len(blocks)
    if n_blocks == 0:
        raise EmptyPackingError(n_tokens, block_size, batch_size)
    return blocks, {
        "docs": len(ds),
        "tokens": n_tokens,
        "blocks": n_blocks,
        "block_size": block_size,
        "tokens_in_blocks": n_blocks * block_size,
        "dropped_tokens": n_tokens - n_blocks * block_size,
        "padding_tokens": 0,
    }


def chars_per_token(
    tokenizer: PreTrainedTokenizerBase, texts_by_language: dict[str, Sequence[str]]
) -> dict[str, dict]:
    """Characters per token of ``tokenizer`` on each language's texts (higher: fewer tokens).

    Measure on held-out text (validation), never the tokenizer's training text: BPE merges what
    it saw. ``texts_by_language`` is what ``lmref.data.language.texts_by_language`` returns.
    """
    out = {}
    for language, texts in texts_by_language.items():
        texts = list(texts)
        # verbose=False: whole documents are counted, not fed to a model, so a text longer than
        # the model's context is fine here (transformers would warn about indexing errors).
        ids = (
            tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        )
        chars, tokens = sum(map(len, texts)), sum(map(len, ids))
        out[language] = {
            "docs": len(texts),
            "chars": chars,
            "tokens": tokens,
            "chars_per_token": round(chars / tokens, 3) if tokens else None,
        }
    return out
