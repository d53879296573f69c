"""Evaluation of causal language models: perplexity, exact-match accuracy, sample generation.

Perplexity is the exponential of the *token-weighted* mean negative log-likelihood over every
evaluation token. Averaging per-batch perplexities (or per-batch losses of unequal batches) is
biased, and exponentiating in half precision overflows: that is how a run ends up reporting
``eval_perplexity: inf`` for a finite loss. ``perplexity`` here only batches a dataset: the
policy (label shift, ignored and padded positions, float64 sums, one exponential) is
``lmref.core.losses.perplexity``, the same loss the trainer reports as ``eval_loss``.

Usage::

    from lmref.evaluation.metrics import perplexity, exact_match, generate_text

    perplexity(model, corpus["validation"])             # {"loss": 5.1, "perplexity": 164.0, "tokens": ...}
    exact_match(model, tokenizer, prompts, answers)     # greedy, {"accuracy": 0.62, "score": ...}
    generate_text(model, tokenizer, ["def main("], max_new_tokens=40, temperature=0.8)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import torch
from torch.utils.data import DataLoader

from lmref.core import losses
from lmref.core.stats import Score


def _collate_input_ids(rows: list[dict]) -> dict:
    return {"input_ids": torch.tensor([list(r["input_ids"]) for r in rows], dtype=torch.long)}


def perplexity(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 16,
    collate_fn: Callable | None = None,
    max_batches: int | None = None,
) -> dict:
    """exp(token-weighted mean NLL) over ``dataset`` (rows with ``input_ids``, optionally
    ``labels`` with ``IGNORE_INDEX`` and ``attention_mask`` for positions that do not count),
    through ``lmref.core.losses.perplexity``: ``{"loss", "perplexity", "tokens"}``."""
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn or _collate_input_ids)

    def batches() -> Iterator[dict]:
        for batch in islice(loader, max_batches):
            yield {k: v.to(device) for k, v in batch.items()}

    return losses.perplexity(model, batches())


@torch.no_grad()
def generate_text(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """Continuations of ``prompts`` (without the prompt): greedy at temperature 0, else sampled.

    Batches are left-padded so that every row's last real token sits at the same position,
    which is what a decoder-only model needs to continue all rows at once.
    """
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
            ).to(device)
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if temperature > 0
                else {"do_sample": False}
            )
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            outputs += tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def exact_match(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> dict:
    """Share of prompts whose greedy continuation equals the answer (surrounding spaces ignored).

    ``score`` is the same count as a :class:`lmref.core.stats.Score`, which prints the accuracy
    with its 95% interval: quote that, not the bare ``accuracy``."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    predictions = generate_text(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    hits = [p.strip() == a.strip() for p, a in zip(predictions, answers)]
    return {
        "accuracy": sum(hits) / len(hits) if hits else 0.0,
        "correct": sum(hits),
        "total": len(hits),
        "score": Score(sum(hits), len(hits)) if hits else None,
        "predictions": predictions,
        "hits": hits,
    }
