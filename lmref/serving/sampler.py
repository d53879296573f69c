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

    from lmref.serving.sampler import SamplingRows, TokenPieces, sample, score_prompt, step_logprobs

    rows = SamplingRows.of(temperatures=[0.0, 0.8], top_ps=[1.0, 0.9], seeds=[0, 7])
    tokens = sample(logits, rows).tolist()   # rows.step advances: the next call draws anew
    pieces = TokenPieces(tokenizer)
    entries = step_logprobs(logits, tokens, top_n=[2, 0], pieces=pieces)   # TokenLogprob per row
    scored = score_prompt(model, prompt_ids, top_n=1, pieces=pieces)    # [0].logprob: None
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

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


# A counter-based generator (the idea of Philox, as in JAX's and vLLM's seeded sampling): a
# row's random number for its k-th token is a hash of (seed, k), computed for all rows at once as
# integer tensor ops. Unlike one torch.Generator per row, it needs no Python loop over rows, and a
# seeded row draws the same numbers whatever else is in the batch, on CPU and GPU alike (integer
# arithmetic is exact). The hash is Wellons' "lowbias32" with multipliers below 2**31, so every
# product of two 32-bit values fits in int64 without overflow.
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 in [0, 1) per row, a function of (seed, step) only: 53 random bits."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    a = _mix32(_mix32(_mix32((steps & _M32) ^ 0x9E3779B9) ^ lo) ^ hi)
    b = _mix32(_mix32(a ^ 0x85EBCA6B) ^ lo)
    return ((a << 21) | (b >> 11)).double() / float(1 << 53)


GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing by ~0 overflows anyway


@dataclass
class SamplingRows:
    """Each running row's sampling settings as tensors on the logits' device: ``temperature``,
    ``top_p``, ``seed`` (int64, below 2**63) and ``step`` (tokens the row sampled: the counter
    of its random numbers). ``top_ps`` and ``greedy`` stay on the host too, so which rows take
    the nucleus path (``nucleus``, their indices on the device) is settled when rows join or
    leave: a step then neither reads the device nor copies to it."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor
    top_ps: tuple[float, ...]
    greedy: tuple[bool, ...]
    nucleus: torch.Tensor | None = None  # rows sampled with top_p < 1; None: none
    # Penalties and logit_bias (lmref.serving.penalties.LogitAdjust); None: no row has any.
    adjust: Any = None

    def __post_init__(self) -> None:
        rows = [k for k, (p, g) in enumerate(zip(self.top_ps, self.greedy)) if p < 1.0 and not g]
        if rows and self.nucleus is None:
            self.nucleus = torch.tensor(rows, dtype=torch.int64, device=self.seed.device)

    @classmethod
    def of(
        cls,
        temperatures: list[float],
        top_ps: list[float],
        seeds: list[int],
        steps: list[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> SamplingRows:
        steps = steps if steps is not None else [0] * len(seeds)
        return cls(
            torch.tensor(temperatures, dtype=torch.float32, device=device),
            torch.tensor(top_ps, dtype=torch.float32, device=device),
            torch.tensor(seeds, dtype=torch.int64, device=device),
            torch.tensor(steps, dtype=torch.int64, device=device),
            tuple(top_ps),
            tuple(t < GREEDY_BELOW for t in temperatures),
        )

    def __len__(self) -> int:
        return len(self.top_ps)

    def select(self, keep: list[int]) -> SamplingRows:
        """Rows ``keep`` (indices, in order), as ``RunningBatch.leave`` keeps them."""
        index = torch.tensor(keep, dtype=torch.int64, device=self.seed.device)
        return SamplingRows(
            self.temperature[index],
            self.top_p[index],
            self.seed[index],
            self.step[index],
            tuple(self.top_ps[k] for k in keep),
            tuple(self.greedy[k] for k in keep),
            adjust=None if self.adjust is None else self.adjust.select(index, keep),
        )

    def cat(self, other: SamplingRows) -> SamplingRows:
        """These rows, then ``other``'s (as ``RunningBatch.join`` appends a prefill's)."""
        return SamplingRows(
            torch.cat([self.temperature, other.temperature]),
            torch.cat([self.top_p, other.top_p]),
            torch.cat([self.seed, other.seed]),
            torch.cat([self.step, other.step]),
            self.top_ps + other.top_ps,
            self.greedy + other.greedy,
            adjust=(
                None
                if self.adjust is None and other.adjust is None
                else (self.adjust or other.adjust).cat(
                    self.adjust, len(self), other.adjust, len(other)
                )
            ),
        )


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative mass exceeds ``u`` times the row's total (the
    mass need not sum to 1: top-p zeroes the tail). float64 sums: 49k float32 terms drift."""
    cdf = probs.double().cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return index.clamp(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """One token per row, as a tensor on the logits' device; each row's ``step`` advances.

    Greedy rows take the argmax; the others sample temperature-scaled probabilities by inverse
    CDF with the row's uniform(seed, step) (vocabulary order; rows with top_p < 1 over the
    probabilities sorted and cut to the nucleus). All rows at once, no Python loop over rows and
    no read of the device: the host reads the tokens once per step, after this."""
    # max's indices are argmax's (the first largest), in a third of the time on CPU: torch's
    # argmax is not vectorized there (64 x 49,152 logits: 1.1 against 2.9 ms, Intel Xeon)
    greedy = logits.max(dim=-1).indices
    if all(rows.greedy):
        rows.step += 1
        return greedy
    scaled = logits.float() / rows.temperature.clamp(min=GREEDY_BELOW).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    u = uniform(rows.seed, rows.step)
    tokens = _inverse_cdf(probs, u)
    if (index := rows.nucleus) is not None:  # sorting 49k entries takes ms a row on a CPU
        sorted_probs, order = probs[index].sort(dim=-1, descending=True, stable=True)
        # Mass before a token >= top_p: outside the nucleus (the likeliest token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= rows.top_p[index].unsqueeze(1)
        picked = _inverse_cdf(sorted_probs.masked_fill(outside, 0.0), u[index])
        tokens = tokens.index_copy(0, index, order.gather(1, picked.unsqueeze(1)).squeeze(1))
    rows.step += 1
    return torch.where(rows.temperature < GREEDY_BELOW, greedy, tokens)


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
