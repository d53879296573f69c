"""Bits per UTF-8 byte of held-out text: a language-modelling score that compares models with
different tokenizers.

Perplexity is per *token*, so a model whose tokenizer cuts text into fewer, longer tokens gets a
higher perplexity for the same text it predicts equally well: the course's small model (a 8k BPE
trained on Python docstrings) and SmolLM2 (a 49k BPE) cannot be compared on it. Bits per byte
divides the total code length of the text (the sum of every token's negative log-likelihood, in
nats, / ln 2) by the text's UTF-8 bytes, which do not depend on the tokenizer. Lower is better;
gzip manages about 2-3 bits per byte on English, a good LM under 1.

The interval is a 95% percentile bootstrap over *documents* (``lmref.core.stats
.bootstrap_interval``, bits and bytes resampled together): tokens within a document are not
independent, documents are.

Usage::

    from lmref.evaluation.bits_per_byte import bits_per_byte

    result = bits_per_byte(model, tokenizer, held_out_texts)
    print(result)          # "1.234 bits/byte [1.180-1.291] (12 docs, 34567 bytes)"
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmref.core.stats import bootstrap_interval


@dataclass(frozen=True)
class BitsPerByte:
    """Bits per byte over all documents, its 95% bootstrap interval over documents, and the
    per-document parts it was built from."""

    value: float
    interval: tuple[float, float]
    bits: tuple[float, ...]  # per document
    nbytes: tuple[int, ...]  # per document
    tokens: int  # tokens scored in all (each once)

    def __str__(self) -> str:
        low, high = self.interval
        return (
            f"{self.value:.3f} bits/byte [{low:.3f}-{high:.3f}] "
            f"({len(self.bits)} docs, {sum(self.nbytes)} bytes)"
        )


@torch.no_grad()
def document_nll(
    model: torch.nn.Module, ids: Sequence[int], max_length: int, stride: int
) -> tuple[float, int]:
    """(sum of NLL in nats, tokens scored) of ``ids[1:]`` given what precedes each token.

    A document longer than the model's context is scored in strided windows (the recipe of
    Hugging Face's "Perplexity of fixed-length models" guide): windows of ``max_length`` tokens
    start every ``stride`` tokens, and each window scores only the tokens no earlier window
    scored, so every token is scored exactly once and, past the first window, with at least
    ``max_length - stride`` tokens of context. A smaller stride gives more context (a lower,
    fairer NLL) for more forward passes. Windows overlap by at least one token (stride <
    max_length): a window's first token has no context inside it, so disjoint chunks would
    leave one token per chunk unscored.
    """
    if not 0 < stride < max_length:
        raise ValueError(f"need 0 < stride < max_length, got {stride=}, {max_length=}")
    device = next(model.parameters()).device
    total, scored, done = 0.0, 0, 1  # ids[0] has no context: it is the BOS the caller adds
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = torch.tensor([list(ids[begin:end])], device=device)
        logprobs = torch.log_softmax(model(window).logits[0].double(), dim=-1)
        # logits at window position j predict the token at j + 1; score targets done..end-1.
        first = done - begin
        targets = window[0, first:]
        total -= float(logprobs[first - 1 : -1].gather(1, targets[:, None]).sum())
        scored += len(targets)
        done = end
        if end == len(ids):
            break
    return total, scored


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer,
    documents: Sequence[str],
    max_length: int | None = None,
    stride: int | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> BitsPerByte:
    """Bits per UTF-8 byte of ``documents`` under ``model`` (any causal LM) and its tokenizer.

    Each document is tokenized without special tokens and preceded by the tokenizer's BOS (its
    EOS where it has no BOS, as GPT-2's; a document boundary either way), so its *first* token
    is scored too: every byte of every document is paid for, whatever the tokenizer.
    ``max_length`` defaults to the model's context (``max_position_embeddings``); ``stride`` to
    half of it (see :func:`document_nll`).
    """
    if len(documents) < 2:
        raise ValueError(
            f"bits per byte needs >= 2 documents for its interval, got {len(documents)}"
        )
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a document")
    max_length = max_length or int(getattr(model.config, "max_position_embeddings", 1024))
    stride = stride or max(1, max_length // 2)
    was_training = model.training
    model.eval()
    bits, nbytes, tokens = [], [], 0
    try:
        for n, doc in enumerate(documents):
            size = len(doc.encode("utf-8"))
            if size == 0:
                raise ValueError(f"document {n} is empty: it has no bytes to divide by")
            ids = [start] + tokenizer(doc, add_special_tokens=False)["input_ids"]
            nll, scored = document_nll(model, ids, max_length, stride)
            bits.append(nll / math.log(2))
            nbytes.append(size)
            tokens += scored
    finally:
        model.train(was_training)
    interval = bootstrap_interval(
        [bits, nbytes], lambda b, y: b.sum(-1) / y.sum(-1), n_resamples=n_resamples, seed=seed
    )
    return BitsPerByte(sum(bits) / sum(nbytes), interval, tuple(bits), tuple(nbytes), tokens)
