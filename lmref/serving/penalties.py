"""OpenAI's ``presence_penalty``, ``frequency_penalty`` and ``logit_bias``, applied per row inside
the batched sampling step.

Each running row may bring its own penalties and bias; the batch holds them as tensors
(``LogitAdjust``: penalties [rows], bias [rows, vocab], and the counts of each row's generated
tokens [rows, vocab]) that join and leave with the rows (``SamplingRows.select`` / ``cat``), so
one step adjusts every row at once with no Python loop over rows. A row without any of them gets
zeros: its logits are unchanged. OpenAI's semantics: from a token's logit subtract
``presence_penalty * (count > 0) + frequency_penalty * count`` (count: times it was generated in
this row so far), then add ``logit_bias[token]``. Reported logprobs stay those of the raw logits
(``lmref.serving.sampler`` says why); only the choice of token sees the adjustment.

Usage::

    from lmref.serving.penalties import adjust_of, sample

    rows.adjust = adjust_of(params, vocab)     # the rows' SamplingParams; None: nothing to do
    tokens = sample(logits, rows)     # sampler.sample over the adjusted logits; counts updated
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmref.serving import sampler


@dataclass
class LogitAdjust:
    """The running rows' penalties, bias and generated-token counts, on the logits' device."""

    presence: torch.Tensor  # [rows] float32
    frequency: torch.Tensor  # [rows] float32
    bias: torch.Tensor  # [rows, vocab] float32
    counts: torch.Tensor  # [rows, vocab] float32: times each token was generated in the row
    active: tuple[bool, ...]  # on the host: whether a row has any adjustment

    @classmethod
    def of(
        cls,
        presence: list[float],
        frequency: list[float],
        biases: list[tuple[tuple[int, float], ...]],
        vocab: int,
        device: torch.device | str = "cpu",
    ) -> LogitAdjust | None:
        """The rows' adjustment; None when no row has one (the step then costs nothing more)."""
        active = tuple(bool(p or f or b) for p, f, b in zip(presence, frequency, biases))
        if not any(active):
            return None
        bias = torch.zeros((len(biases), vocab), dtype=torch.float32)
        for k, pairs in enumerate(biases):
            if pairs:
                ids, values = zip(*pairs)
                bias[k, list(ids)] = torch.tensor(values, dtype=torch.float32)
        return cls(
            torch.tensor(presence, dtype=torch.float32, device=device),
            torch.tensor(frequency, dtype=torch.float32, device=device),
            bias.to(device),
            torch.zeros((len(biases), vocab), dtype=torch.float32, device=device),
            active,
        )

    @classmethod
    def none(cls, rows: int, vocab: int, device: torch.device) -> LogitAdjust:
        zeros = torch.zeros(rows, dtype=torch.float32, device=device)
        table = torch.zeros((rows, vocab), dtype=torch.float32, device=device)
        return cls(zeros, zeros.clone(), table, table.clone(), (False,) * rows)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The adjusted logits (float32, a new tensor)."""
        counts = self.counts
        return (
            logits.float()
            - self.presence.unsqueeze(1) * (counts > 0)
            - self.frequency.unsqueeze(1) * counts
            + self.bias
        )

    def observe(self, tokens: torch.Tensor) -> None:
        """Count each row's newly sampled token."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.counts[rows, tokens] += 1

    def select(self, index: torch.Tensor, keep: list[int]) -> LogitAdjust | None:
        """Rows ``keep`` (``index``: the same on the device); None when none is adjusted."""
        if not any(self.active[k] for k in keep):
            return None
        return LogitAdjust(
            self.presence[index],
            self.frequency[index],
            self.bias[index],
            self.counts[index],
            tuple(self.active[k] for k in keep),
        )

    @staticmethod
    def cat(
        a: LogitAdjust | None, rows_a: int, b: LogitAdjust | None, rows_b: int
    ) -> LogitAdjust | None:
        """``a``'s rows then ``b``'s; a side without an adjustment gets zeros."""
        if a is None and b is None:
            return None
        known = a if a is not None else b
        vocab, device = known.bias.shape[1], known.bias.device
        a = a if a is not None else LogitAdjust.none(rows_a, vocab, device)
        b = b if b is not None else LogitAdjust.none(rows_b, vocab, device)
        return LogitAdjust(
            torch.cat([a.presence, b.presence]),
            torch.cat([a.frequency, b.frequency]),
            torch.cat([a.bias, b.bias]),
            torch.cat([a.counts, b.counts]),
            a.active + b.active,
        )


def adjust_of(params: list, vocab: int, device: torch.device | str = "cpu") -> LogitAdjust | None:
    """The adjustment of rows with these ``SamplingParams`` (None: no row has one)."""
    return LogitAdjust.of(
        [p.presence_penalty for p in params],
        [p.frequency_penalty for p in params],
        [p.logit_bias for p in params],
        vocab,
        device,
    )


def sample(logits: torch.Tensor, rows: sampler.SamplingRows) -> torch.Tensor:
    """``sampler.sample`` over the rows' adjusted logits; their counts take the new tokens."""
    adjust = rows.adjust
    if adjust is None:
        return sampler.sample(logits, rows)
    tokens = sampler.sample(adjust.apply(logits), rows)
    adjust.observe(tokens)
    return tokens
