"""The one causal-LM loss and the one perplexity: every stage that scores next tokens uses these.

Policy, decided once:

- **Label shift.** Position ``t`` predicts token ``t + 1``. The labels are shifted, not the
  logits: slicing ``logits[:, :-1]`` would copy the largest tensor of the step (batch x sequence
  x vocabulary) before the loss and again in backward.
- **What counts.** A position counts when its label is not ``IGNORE_INDEX`` (-100, the value
  torch's cross-entropy skips, which the Hugging Face collators write) and, where an attention
  mask is given, when the target token is a real one (padding never counts, whatever its label).
- **Token-weighted mean.** Losses are summed over counted tokens and divided once by how many
  there were, over the whole batch, optimizer step or evaluation set. A mean of per-batch means
  weighs a short batch like a long one.
- **Precision.** The loss is computed in float32 (float64 for perplexity's sums), and the
  exponential is taken once, in Python: ``exp`` of a half-precision loss overflows to ``inf``.

Usage::

    from lmref.core.losses import causal_lm_loss, perplexity

    loss = causal_lm_loss(model, batch)              # mean NLL over the batch's counted tokens
    loss.backward()
    perplexity(model, batches)                       # {"loss": 2.31, "perplexity": 10.1, "tokens": 8192}
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


def shift_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The label each position predicts (the next one), ``IGNORE_INDEX`` where nothing counts.

    ``attention_mask`` (0 marks padding) removes padded targets whatever their label; the last
    position predicts nothing.
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def shifted_targets(batch: dict) -> torch.Tensor:
    """``shift_labels`` of a batch: ``input_ids`` and optionally ``labels`` (default: the
    inputs) and ``attention_mask`` (0 marks padding; a padded target never counts)."""
    labels = batch.get("labels")
    labels = batch["input_ids"] if labels is None else labels
    return shift_labels(labels, batch.get("attention_mask"))


def target_count(batch: dict) -> torch.Tensor:
    """How many positions of ``batch`` count in the loss (a 0-d tensor on the batch's device)."""
    return (shifted_targets(batch) != IGNORE_INDEX).sum()


def nll_sum(
    logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` under ``logits`` (``(..., vocab)`` against
    ``(...)``), skipping ``IGNORE_INDEX``; computed in ``dtype`` (float32 at least)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(dtype),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def loss_sum_from_logits(
    logits: torch.Tensor, batch: dict, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL over the counted positions, and how many there were."""
    targets = shifted_targets(batch)
    return nll_sum(logits, targets, dtype), (targets != IGNORE_INDEX).sum()


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


def causal_lm_loss_sum(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``batch``; the NLL sum over counted tokens and their number.

    A sum, not a mean: a trainer divides by the tokens of the whole optimizer step, so every
    token weighs the same whatever micro-batch or rank it landed on.
    """
    return loss_sum_from_logits(_logits(model, batch), batch)


def answer_loss_sum(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``causal_lm_loss_sum`` with the output head run only where a position counts.

    The vocabulary projection and its cross-entropy are the largest tensors of a fine-tuning
    step, yet an instruction's loss counts only its answer. So the model is asked for the logits
    of the counted positions alone (transformers' ``logits_to_keep`` with a boolean mask of
    batch x sequence, which Llama-style and GPT-2 models take; it returns them flattened): the
    same sum up to float rounding. On the course's instruction batches, where answers are about a
    sixth of the tokens, a step took about 15% less time (2 CPU cores). Where every position
    counts (pretraining) it saves nothing.
    """
    targets = shifted_targets(batch)
    counted = targets != IGNORE_INDEX
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        logits_to_keep=counted,
    ).logits
    return nll_sum(logits, targets[counted]), counted.sum()


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The token-weighted mean NLL of one batch (what ``model(..., labels=...)`` reports too,
    for a batch without padding)."""
    loss, tokens = causal_lm_loss_sum(model, batch)
    return loss / tokens.clamp(min=1)


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches: Iterable[dict]) -> tuple[float, int]:
    """(NLL summed in float64 over every counted token of ``batches``, how many counted), in
    eval mode. The sums, not the mean: a caller that shards the batches over ranks adds them up
    across ranks first (``lmref.training.loop.evaluate_loss``)."""
    was_training = model.training
    model.eval()
    try:
        nll, tokens = 0.0, 0
        for batch in batches:
            loss, n = loss_sum_from_logits(_logits(model, batch), batch, dtype=torch.float64)
            nll += float(loss)
            tokens += int(n)
    finally:
        model.train(was_training)
    return nll, tokens


def perplexity(model: torch.nn.Module, batches: Iterable[dict]) -> dict:
    """exp(token-weighted mean NLL) over ``batches`` (dicts of tensors on the model's device).

    Returns ``{"loss", "perplexity", "tokens"}``; raises ValueError when no token counts.
    """
    nll, tokens = loss_sums(model, batches)
    if tokens == 0:
        raise ValueError(
            f"no tokens to evaluate: the batches are empty or every label is {IGNORE_INDEX}"
        )
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
