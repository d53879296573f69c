"""Completions' ``echo``: the prompt's log-probabilities from the prefill's own forward pass, and
the prompt sent first on a stream.

How lm-evaluation-harness scores a continuation (``echo: true, logprobs: 1, max_tokens: 1``):
every prompt token's log-probability given the tokens before it. The prefill computes exactly
those logits on its way to the first generated token, so a scored row keeps them there
(``Prefill(score=...)`` calls back once per chunk) instead of a second pass over the prompt;
only ``max_tokens: 0`` (score, generate nothing) runs a pass of its own
(``sampler.score_prompt``), as there is no generation to share it with.

Usage::

    from lmref.serving.echo import echo_delta, prompt_scorers

    score = prompt_scorers(rows, pieces)     # {row index: callback}; sets row.prompt_logprobs
    prefill = Prefill(model, prompts, pad_id, score=score)
    echo_delta(row, decode)                  # a stream's first Delta: the prompt, its logprobs
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmref.serving.request import Delta, Request
from lmref.serving.sampler import TokenLogprob, TokenPieces, score_prompt, step_logprobs

Scorer = Callable[[torch.Tensor, list[int]], None]


def prompt_scorers(rows: list[Request], pieces: TokenPieces) -> dict[int, Scorer]:
    """For each row (by its index in ``rows``) that echoes with logprobs: a callback that takes
    the logits of some prompt positions and the prompt tokens they predict; the row's
    ``prompt_logprobs`` starts with the first token (no context: logprob None)."""
    scorers: dict[int, Scorer] = {}
    for k, row in enumerate(rows):
        top = row.params.logprobs
        if not row.params.echo or top is None:
            continue
        first = row.prompt_ids[0]
        row.prompt_logprobs = [TokenLogprob(first, *pieces(first), None)]

        def take(logits: torch.Tensor, ids: list[int], row=row, top=top) -> None:
            row.prompt_logprobs.extend(step_logprobs(logits, ids, [top] * len(ids), pieces))

        scorers[k] = take
    return scorers


def score_alone(row: Request, model, pieces: TokenPieces) -> None:
    """A row that generates nothing (``max_tokens: 0``): its own pass over the prompt."""
    if row.params.logprobs is not None:
        row.prompt_logprobs = score_prompt(model, row.prompt_ids, row.params.logprobs, pieces)


def prompt_text(row: Request, decode: Callable[..., str]) -> str:
    """The prompt as echoed: its own text, or token ids / chat decoded with special tokens."""
    return row.prompt if isinstance(row.prompt, str) else decode(row.prompt_ids, False)


def echo_delta(row: Request, decode: Callable[..., str]) -> None:
    """On a streaming echo row, before its first token: the prompt's text and logprobs."""
    if row.params.echo and row.job.stream:
        row.job.events.put(
            Delta(row.index, prompt_text(row, decode), tuple(row.prompt_logprobs or ()))
        )
