"""How much memory a KV cache takes: the arithmetic from a model's config, and a real cache's size.

A decoder keeps, in every layer, one key and one value vector per KV head for every token of
every sequence it is generating (so a new token attends to the old ones without recomputing
them). Hence

    bytes = 2 (K and V) x layers x kv_heads x head_dim x tokens x bytes per element

With grouped-query attention (GQA) several query heads share one KV head, so ``kv_heads`` is the
config's ``num_key_value_heads``, not ``num_attention_heads``: Llama-2-7B (32 layers, 32 KV heads
of 128, fp16) keeps 0.5 MiB per token; Llama-3-8B (the same depth and head size, 8 KV heads)
128 KiB. A server's memory for the cache, not its arithmetic, bounds how many tokens (sequences
times their length) can decode together; vLLM's PagedAttention allocates it in blocks for that
reason. ``cache_bytes`` measures a real cache (what ``lmref.serving.batching`` holds) so the
arithmetic can be checked against it.

Usage::

    from lmref.serving.kv_memory import LLAMA2_7B, KVShape, cache_bytes

    shape = KVShape.of(model.config, torch.float32)   # SmolLM2-135M: 30 x 3 x 64, 46080 B/token
    shape.bytes(tokens=2048, sequences=16)            # a batch of 16 at 2048 tokens each
    LLAMA2_7B.bytes_per_token() / 2**20               # 0.5 (MiB)
    out = model(ids, use_cache=True)
    assert cache_bytes(out.past_key_values) == shape.bytes(ids.shape[1], ids.shape[0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    """What one token costs in a KV cache: per layer, ``kv_heads`` keys and values of ``head_dim``."""

    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_element: int  # 4: fp32, 2: fp16/bf16, 1: an int8/fp8 cache

    @classmethod
    def of(cls, config, dtype: torch.dtype = torch.float16) -> KVShape:
        """From a Hugging Face config (Llama, Mistral, Qwen ... field names); ``dtype``: the
        cache's (a model's activations' dtype, fp32 on the course's CPU)."""
        heads = config.num_attention_heads
        # Configs without GQA leave num_key_value_heads out (one KV head per query head); older
        # ones leave head_dim out (the hidden size split evenly over the heads).
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = torch.empty((), dtype=dtype).element_size()
        return cls(config.num_hidden_layers, kv_heads, head_dim, element)

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element

    def bytes(self, tokens: int, sequences: int = 1) -> int:
        """The cache of ``sequences`` rows of ``tokens`` each (padding counts: it is stored)."""
        return self.bytes_per_token() * tokens * sequences

    def tokens_in(self, budget_bytes: float) -> int:
        """How many tokens (summed over the sequences) a memory budget holds."""
        return int(budget_bytes // self.bytes_per_token())


# The two 7-8B reference points: one KV head per query head, and GQA with 4 query heads per KV head.
LLAMA2_7B = KVShape(layers=32, kv_heads=32, head_dim=128, bytes_per_element=2)
LLAMA3_8B = KVShape(layers=32, kv_heads=8, head_dim=128, bytes_per_element=2)


def cache_bytes(cache) -> int:
    """The bytes a real KV cache holds: every layer's key and value tensors, summed. ``cache``: a
    transformers ``Cache`` (``DynamicCache``: ``.layers`` with ``.keys``/``.values``) or the
    legacy tuple of ``(key, value)`` pairs per layer. A layer not filled yet holds nothing (a
    ``DynamicCache`` allocates a layer at its first update)."""
    layers = getattr(cache, "layers", None)
    pairs = [(layer.keys, layer.values) for layer in layers] if layers is not None else cache
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair[:2] if t is not None)
