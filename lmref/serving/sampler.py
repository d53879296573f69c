"""Choosing each row's next token, and the log-probabilities an OpenAI-style API reports.

A serving engine batches requests that each bring their own temperature, top-p and seed, and some
ask for ``logprobs``: the log-probability of every token they got and of the ``top_logprobs`` most
likely alternatives, or (``echo`` on completions, how lm-evaluation-harness scores a
continuation) of every prompt token. This module holds those per-token decisions; it needs torch
and a Hugging Face tokenizer only (``lmref.serving.engine`` calls it).

Which distribution is reported: the model's log-softmax of the raw logits, before temperature and
top-p, as OpenAI and vLLM (its default ``raw_logprobs``) report them: so a token's logprob does
not depend on the sampling settings, and a greedy request's numbers are the ones a log-likelihood
evaluation needs.

Usage::

    from lmref.serving.sampler import TokenPieces, sample, score_prompt, step_logprobs

    tokens = sample(logits, temperatures=[0.0, 0.8], top_ps=[1.0, 0.9], generators=[None, g])
    pieces = TokenPieces(tokenizer)
    entries = step_logprobs(logits, tokens, top_n=[2, 0], pieces=pieces)   # TokenLogprob per row
    scored = score_prompt(model, prompt_ids, top_n=1, pieces=pieces)    # [0].logprob: None
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopLogprob:
    token: str  # the token's text; "bytes:\\xe3\\x81" when it is part of a character
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    bytes: tuple[int, ...]
    logprob: float | None  # None: a prompt's first token (it has no context)
    top: tuple[TopLogprob, ...] = ()  # most likely first


class TokenPieces:
    """Token id -> (text, UTF-8 bytes), cached. Byte-level BPE tokens (GPT-2, Llama 3, SmolLM2)
    are mapped back through the byte table their tokenizer used, so a token holding half of a
    character still has its exact bytes; special tokens are their own text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._special = set(tokenizer.all_special_ids)
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_of = None
        if type(decoder).__name__ == "ByteLevel":
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        if token_id not in self._cache:
            tok = self.tokenizer
            raw = tok.convert_ids_to_tokens(token_id)
            if token_id in self._special or raw is None:
                data = (raw or "").encode()
            elif self._byte_of is not None and all(c in self._byte_of for c in raw):
                data = bytes(self._byte_of[c] for c in raw)
            else:  # SentencePiece and others: the tokenizer's own decoding of the token alone
                data = tok.decode([token_id], clean_up_tokenization_spaces=False).encode()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # OpenAI's spelling of a token that is not whole UTF-8
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            self._cache[token_id] = (text, tuple(data))
        return self._cache[token_id]


def sample(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row: greedy below temperature 1e-5, else temperature + top-p with the row's
    own seeded generator, so a seeded request gives the same text whatever shares its batch."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for k, (temperature, top_p) in enumerate(zip(temperatures, top_ps)):
        if temperature < 1e-5:  # dividing by ~0 overflows: that limit is greedy anyway
            tokens.append(greedy[k])
            continue
        probs = torch.softmax(logits[k].float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # always keeps the top one
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=generators[k])
            tokens.append(int(order[choice]))
        else:
            tokens.append(int(torch.multinomial(probs, 1, generator=generators[k])))
    return tokens


def _entries(
    logprobs: torch.Tensor, chosen: list[int], top_n: list[int], pieces: TokenPieces
) -> list[TokenLogprob]:
    """``logprobs``: (rows, vocab) log-softmax; one TokenLogprob per row, ``top_n[k]`` alternatives."""
    picked = logprobs.gather(1, torch.tensor(chosen, device=logprobs.device)[:, None])[
        :, 0
    ].tolist()
    widest = max(top_n, default=0)
    top_values = top_ids = [[] for _ in chosen]
    if widest > 0:
        values, ids = logprobs.topk(min(widest, logprobs.shape[-1]), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    out = []
    for k, token_id in enumerate(chosen):
        top = tuple(
            TopLogprob(*pieces(i), v)
            for i, v in zip(top_ids[k][: top_n[k]], top_values[k][: top_n[k]])
        )
        out.append(TokenLogprob(token_id, *pieces(token_id), picked[k], top))
    return out


def step_logprobs(
    logits: torch.Tensor, tokens: list[int], top_n: list[int], pieces: TokenPieces
) -> list[TokenLogprob]:
    """The sampled ``tokens`` (one per row of ``logits``) with their log-probabilities."""
    return _entries(torch.log_softmax(logits.float(), dim=-1), tokens, top_n, pieces)


@torch.inference_mode()
def score_prompt(model, ids: list[int], top_n: int, pieces: TokenPieces) -> list[TokenLogprob]:
    """Every prompt token's log-probability given the tokens before it (one forward pass over
    the prompt); the first token has no context, so its logprob is None, as in OpenAI's API."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1]
    scored = (
        _entries(
            torch.log_softmax(logits.float(), dim=-1), ids[1:], [top_n] * (len(ids) - 1), pieces
        )
        if len(ids) > 1
        else []
    )
    return [TokenLogprob(ids[0], *pieces(ids[0]), None), *scored]


def reported(starts: list[int], text_length: int) -> int:
    """How many tokens a reply of ``text_length`` characters reports, given where each token's
    text starts (in order): a stop string cuts the text, and tokens that start at or after the cut
    are not part of the answer (a token the cut splits is)."""
    return bisect.bisect_left(starts, text_length)
