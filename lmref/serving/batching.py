"""The running batch of a continuous-batching engine: rows join and leave between decode steps.

Used by ``lmref.serving.engine`` (its worker thread owns one ``RunningBatch`` per model) for
every model but a plain Llama, which decodes over ``lmref.serving.slot_batch`` (a preallocated
cache; it keeps ``Prefill`` from here); needs torch and transformers' ``DynamicCache`` only, so
it can be copied alone.

Layout, chosen for a CPU: one ``DynamicCache`` holds every running row, left padded, so each
row's newest token is in the last column and one decode step is a single forward of shape
(rows, 1) with plain dense attention (``sdpa``) over a 2-D padding mask. Position ids are per
row, so a padded row sees the positions it would alone (its greedy text is the same).

- New rows are prefilled on their own (``Prefill``): left padded together, in chunks of
  ``chunk_tokens`` columns, so the engine runs a decode step of the running rows between chunks
  and a long prompt does not stall them for long. A prompt start that requests share (a chat
  template's system prompt) is computed once (``PrefixCache``) and copied, not recomputed.
- ``RunningBatch.join(prefill)`` merges the new rows' KV into the batch: the shorter of the two
  caches is left padded (zeros, masked) and both are concatenated on the batch dimension.
- ``RunningBatch.leave(keep)`` drops finished rows at once (index select), then trims the
  columns no remaining row attends to, so a long prompt that left costs nothing more.

Why not transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``,
what ``transformers serve --continuous-batching`` runs): it applies one ``GenerationConfig`` to
every request (transformers 5.23's serve re-inits it per request, a TODO there), gives no raw
logits to sample each row with its own temperature/top-p/seed or to report logprobs, and its
paged-attention kernels are written for GPUs; on CPU the dense padded batch is simple and fast
(``benchmarks/serving_peer.py`` measures the two side by side).

Usage::

    batch = RunningBatch(model)
    prefill = Prefill(model, [[1, 5, 9], [1, 7]], pad_id=0, chunk_tokens=256)
    while (logits := prefill.step()) is None:
        pass                      # a decode step of the running rows can go here
    batch.join(prefill)           # sample the new rows' first tokens from ``logits`` first
    logits = batch.step([11, 12])   # one token per running row, in join order
    batch.leave([1])              # keep row 1 only
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@functools.cache
def _cache_name(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache: DynamicCache) -> dict:
    """The forward keyword for a KV cache: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` (the old name warns that it goes in 5.40); earlier 5.x know the old name only. A
    PEFT wrapper passes keywords through to its base model, so that model's signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_name(type(base)): cache}


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """The KV of one prompt start that requests share (a chat template's system prompt): computed
    once, then copied into each new row's cache, so its prefill runs over the rest only. The
    prefix is learnt as the common start of two prompts in a row, when at least ``min_tokens``
    long (0 turns it off); one prefix at a time (a new common start replaces it)."""

    def __init__(self, model, min_tokens: int = 16):
        self.model, self.min_tokens = model, min_tokens
        self.ids: list[int] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last: list[int] | None = None

    def usable(self, prompts: list[list[int]]) -> int:
        """How many tokens of the cached prefix every prompt starts with (0: too few to use).
        Each prompt keeps at least its last token to run: its logits are the next token's."""
        n = len(self.ids)
        for prompt in prompts:
            n = min(n, _common(self.ids, prompt), len(prompt) - 1)
        return n if self.min_tokens > 0 and n >= self.min_tokens else 0

    @torch.inference_mode()
    def observe(self, prompt: list[int]) -> None:
        """Learn a new prefix from this prompt and the one before, when the cached one fails it."""
        if self.min_tokens <= 0:
            return
        if self._last is not None and not self.usable([prompt]):
            n = min(_common(self._last, prompt), len(prompt) - 1)
            if n >= self.min_tokens:
                cache = DynamicCache(config=self.model.config)
                device = next(self.model.parameters()).device
                self.model(
                    input_ids=torch.tensor([prompt[:n]], device=device),
                    **cache_kwargs(self.model, cache),
                    use_cache=True,
                    logits_to_keep=1,
                )
                self.ids, self.kv = prompt[:n], [(lr.keys, lr.values) for lr in cache.layers]
        self._last = prompt


class Prefill:
    """New rows' prompts run through the model, ``chunk_tokens`` columns per ``step()``; with a
    ``PrefixCache`` (which learns from these prompts) whose prefix all rows start with, only the
    rest of each prompt runs (padding then sits between the shared prefix and the rest, masked)."""

    def __init__(
        self,
        model,
        prompts: list[list[int]],
        pad_id: int,
        chunk_tokens: int = 256,
        prefix: PrefixCache | None = None,
        score: dict[int, Callable[[torch.Tensor, list[int]], None]] | None = None,
    ):
        device = next(model.parameters()).device
        self.model, self.chunk_tokens = model, max(1, chunk_tokens)
        for prompt in prompts if prefix is not None else []:
            prefix.observe(prompt)
        # Rows in ``score`` get the logits of every prompt position (lmref.serving.echo): a
        # shared prefix would skip some, so such a group computes its whole prompts.
        self.score = score or {}
        self.shared = n = prefix.usable(prompts) if prefix is not None and not score else 0
        rests = [prompt[n:] for prompt in prompts]
        longest = max(len(r) for r in rests)
        self.pad = [longest - len(r) for r in rests]  # each row's padding columns
        ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), n + longest), dtype=torch.long)
        attention[:, :n] = 1
        for i, rest in enumerate(rests):  # left padding: every last prompt token is at -1
            ids[i, longest - len(rest) :] = torch.tensor(rest)
            attention[i, n + longest - len(rest) :] = 1
        self.ids, self.attention = ids.to(device), attention.to(device)
        # Positions count real tokens only, so a padded row sees the positions it would alone.
        self.positions = (self.attention.cumsum(-1) - 1).clamp(min=0)[:, n:]
        self.cache = DynamicCache(config=model.config)
        for layer, (keys, values) in enumerate(prefix.kv if n else []):
            shape = (len(prompts), -1, -1, -1)
            self.cache.update(
                keys[:, :, :n].expand(shape).contiguous(),
                values[:, :, :n].expand(shape).contiguous(),
                layer,
            )
        self.done_columns = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    @torch.inference_mode()
    def step(self) -> torch.Tensor | None:
        """Run the next chunk; the last one returns the logits of each row's next token."""
        start, width = self.done_columns, self.ids.shape[1]
        end = min(start + self.chunk_tokens, width)
        logits = self.model(
            input_ids=self.ids[:, start:end],
            attention_mask=self.attention[:, : self.shared + end],
            position_ids=self.positions[:, start:end],
            **cache_kwargs(self.model, self.cache),
            use_cache=True,
            logits_to_keep=0 if self.score else 1,  # 0: every position's
        ).logits
        self.done_columns = end
        for row, take in self.score.items():
            # Column c's logits predict column c + 1's token; padding columns predict nothing.
            first = max(start, self.pad[row])
            last = min(end, width - 1)
            if first < last:
                ids = self.ids[row, first + 1 : last + 1].tolist()
                take(logits[row, first - start : last - start], ids)
        return logits[:, -1, :] if end == width else None


class RunningBatch:
    """Rows that decode together: one shared, left-padded KV cache and per-row positions."""

    def __init__(self, model):
        self.model = model
        self.cache: DynamicCache | None = None
        self.attention: torch.Tensor | None = None  # (rows, columns) 1: a real token
        self.next_position: torch.Tensor | None = None  # (rows, 1)

    def __len__(self) -> int:
        return 0 if self.attention is None else self.attention.shape[0]

    def join(self, prefill: Prefill) -> None:
        """Add a finished prefill's rows after the running ones."""
        next_position = prefill.positions[:, -1:] + 1
        if not len(self):
            self.cache, self.attention = prefill.cache, prefill.attention
            self.next_position = next_position
            return
        width = max(self.attention.shape[1], prefill.attention.shape[1])
        for mine, theirs in zip(self.cache.layers, prefill.cache.layers):
            if type(mine) is not DynamicLayer or type(theirs) is not DynamicLayer:
                raise NotImplementedError(
                    "joining rows needs full-attention cache layers "
                    f"(DynamicLayer), not {type(mine).__name__}"
                )
            mine.keys = torch.cat(
                [_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)]
            )
            mine.values = torch.cat(
                [_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)]
            )
        self.attention = torch.cat(
            [_pad_left(self.attention, width, 1), _pad_left(prefill.attention, width, 1)]
        )
        self.next_position = torch.cat([self.next_position, next_position])

    def leave(self, keep: list[int]) -> list[int]:
        """Keep only rows ``keep`` (indices into the current rows, in order); returns ``keep``
        (the rows' new order, as ``SlotBatch.leave`` returns its own)."""
        if not keep:
            self.cache = self.attention = self.next_position = None
            return keep
        if len(keep) == len(self):
            return keep
        index = torch.tensor(keep, device=self.attention.device)
        self.cache.batch_select_indices(index)
        self.attention, self.next_position = self.attention[index], self.next_position[index]
        first = int(self.attention.any(0).int().argmax())  # columns left of it: padding for all
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.attention = self.attention[:, first:]
        return keep

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; returns the logits of each row's next token (rows, vocab)."""
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(self), 1))], 1)
        step = torch.tensor(tokens, device=self.attention.device).unsqueeze(1)
        logits = self.model(
            input_ids=step,
            attention_mask=self.attention,
            position_ids=self.next_position,
            **cache_kwargs(self.model, self.cache),
            use_cache=True,
        ).logits[:, -1, :]
        self.next_position = self.next_position + 1
        return logits
