"""The running batch of the engine for Llama models: a preallocated KV cache with a slot per row.

``lmref.serving.batching.RunningBatch`` runs any transformers model through its own forward and
a ``DynamicCache``; this is the faster path the engine takes when the loader could build a
``FusedLlama`` (``lmref.serving.fused_llama``: the decode step in few, large calls). Profiled
on SmolLM2-135M (``benchmarks/serving_peer.py``), the generic step also spent time outside the
weights that this layout removes:

- ``DynamicCache.update`` concatenates every layer's keys and values at every step, copying the
  whole cache, and ``join`` pads and concatenates it again. Here each row owns a slot of a
  preallocated cache: a step writes one column in place, a joining row copies its own prompt
  in, and a leaving row frees its slot (the last row moves into the hole: one row's copy).
- Left padding makes every row attend over the longest row's columns. Here a row's tokens start
  at column 0 of its slot; a (rows, columns) mask hides the columns past its length.
- The cache grows by doubling (rows or columns), so growing to N columns copies it log2(N)
  times. It holds slots x columns x 2 x layers x kv_heads x head_dim values (SmolLM2-135M in
  fp32: 45 KiB a column, so 64 slots of 256 columns take 720 MiB), as a left-padded cache holds
  rows x its longest row; it keeps that size while rows run and returns to its first size
  when the last row leaves. The engine's first size is ``max_batch_size`` slots of 256
  columns, allocated and touched once at start (``lmref.serving.warm_up``) and kept, so a
  burst of requests meets no fresh memory. Keys are stored transposed, (head_dim, columns) a
  row and head: ``FusedLlama.decode`` says why.

Prefill stays on the model's forward (``batching.Prefill``: chunks, shared prefix, echo): a
finished prefill's rows copy their real columns into free slots.

Usage::

    fused = FusedLlama.of(model)          # before pack_linears; None: not a plain Llama
    batch = SlotBatch(model, fused)       # the same calls as RunningBatch:
    batch.join(prefill)                   # after prefill.step() returned the logits
    logits = batch.step([11, 12])         # (rows, vocab)
    order = batch.leave([1])              # the kept rows' old indices, in their new order
"""

from __future__ import annotations

import math

import torch

from lmref.serving.batching import Prefill
from lmref.serving.fused_llama import FusedLlama


class SlotBatch:
    """Rows that decode together, each in its own slot of a preallocated KV cache."""

    def __init__(self, model, fused: FusedLlama, slots: int = 4, columns: int = 256):
        self.model, self.fused, self.first_size = model, fused, (slots, columns)
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.rows = 0
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)  # tokens per row
        # values: (layers, slots, kv_heads, columns, head_dim); keys: the last two swapped
        self.keys = self.values = None
        self._allocate(slots, columns)

    def __len__(self) -> int:
        return self.rows

    @property
    def size(self) -> tuple[int, int]:
        """(slots, columns) the cache has room for; (0, 0) before it is allocated."""
        return (0, 0) if self.values is None else (self.values.shape[1], self.values.shape[3])

    def _allocate(self, slots: int, columns: int) -> None:
        """Room for at least ``slots`` rows of ``columns`` tokens, keeping what is held."""
        old_slots, old_columns = self.size
        if slots <= old_slots and columns <= old_columns:
            return
        slots = old_slots if slots <= old_slots else max(slots, 2 * old_slots)
        columns = old_columns if columns <= old_columns else max(columns, 2 * old_columns)
        fused = self.fused
        layers, kv, d = len(fused.layers), fused.kv_heads, fused.head_dim
        keys = torch.zeros((layers, slots, kv, d, columns), dtype=self.dtype, device=self.device)
        values = torch.zeros((layers, slots, kv, columns, d), dtype=self.dtype, device=self.device)
        if old_slots:
            keys[:, :old_slots, ..., :old_columns] = self.keys
            values[:, :old_slots, :, :old_columns] = self.values
        self.keys, self.values = keys, values
        if columns > old_columns:
            self.tables = fused.rotary_tables(columns, values[0, 0, 0])

    def join(self, prefill: Prefill) -> None:
        """Copy a finished prefill's rows (their attended columns) into the next free slots."""
        real = prefill.attention.bool()  # (rows, columns): padding sits left of or inside a row
        lengths = real.sum(1)
        first, sizes = self.rows, lengths.tolist()
        self._allocate(first + len(sizes), max(sizes) + 1)
        keys = torch.stack([layer.keys for layer in prefill.cache.layers])  # all layers at once
        values = torch.stack([layer.values for layer in prefill.cache.layers])
        for i, size in enumerate(sizes):
            self.keys[:, first + i, ..., :size] = keys[:, i][:, :, real[i]].transpose(-1, -2)
            self.values[:, first + i, :, :size] = values[:, i][:, :, real[i]]
        self.lengths = torch.cat([self.lengths[:first], lengths.to(self.device)])
        self.rows += len(sizes)

    def leave(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep`` (old indices); returns the kept rows' old indices in their new
        order: a row past the new end moves into a freed slot, the rest stay where they are."""
        kept = len(keep)
        staying = {k for k in keep if k < kept}
        holes = [k for k in range(kept) if k not in staying]
        movers = [k for k in keep if k >= kept]
        order = list(range(kept))
        for hole, mover in zip(holes, movers):
            self.keys[:, hole] = self.keys[:, mover]
            self.values[:, hole] = self.values[:, mover]
            order[hole] = mover
        self.lengths = self.lengths[torch.tensor(order, dtype=torch.long, device=self.device)]
        self.rows = kept
        if not kept and math.prod(self.size) > math.prod(self.first_size):
            self.keys = self.values = None  # idle: give back what a busy spell took
            self._allocate(*self.first_size)
        return order

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; returns the logits of each row's next token (rows, vocab)."""
        width = int(self.lengths.max()) + 1
        self._allocate(self.rows, width)
        logits = self.fused.decode(
            torch.tensor(tokens, device=self.device),
            self.lengths,
            self.keys,
            self.values,
            self.tables,
            width,
        )
        self.lengths = self.lengths + 1
        return logits
