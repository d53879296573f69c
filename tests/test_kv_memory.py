"""KV-cache arithmetic (``lmref.serving.kv_memory``) against the caches transformers really builds."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmref.serving.batching import Prefill, RunningBatch
from lmref.serving.kv_memory import LLAMA2_7B, LLAMA3_8B, KVShape, cache_bytes

pytestmark = pytest.mark.unit


def tiny_llama(**overrides) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA: 3 query heads per KV head
        max_position_embeddings=64,
        **overrides,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_the_reference_models_per_token():
    assert LLAMA2_7B.bytes_per_token() == 2**19  # 0.5 MiB
    assert LLAMA3_8B.bytes_per_token() == 128 * 2**10  # GQA: a quarter of the KV heads
    assert LLAMA2_7B.bytes(tokens=4096, sequences=8) == 16 * 2**30
    assert LLAMA3_8B.tokens_in(2**30) == 8192


def test_shape_from_a_config_counts_kv_heads_not_query_heads():
    smollm2 = LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    )
    shape = KVShape.of(smollm2, torch.float32)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (30, 3, 64)
    assert shape.bytes_per_token() == 2 * 30 * 3 * 64 * 4
    # A config without GQA or head_dim: one KV head per query head, hidden split evenly.
    gpt2 = KVShape.of(GPT2Config(n_embd=64, n_layer=2, n_head=4), torch.bfloat16)
    assert (gpt2.layers, gpt2.kv_heads, gpt2.head_dim, gpt2.bytes_per_element) == (2, 4, 16, 2)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arithmetic_equals_the_cache_a_forward_pass_builds(dtype):
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 64, (3, 11))
    cache = model(ids, use_cache=True).past_key_values
    shape = KVShape.of(model.config, dtype)
    assert shape.kv_heads == 2 and shape.head_dim == 8
    assert cache_bytes(cache) == shape.bytes(tokens=11, sequences=3)
    # One more token grows every layer's K and V by one position.
    model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert cache_bytes(cache) == shape.bytes(tokens=12, sequences=3)
    legacy = [(layer.keys, layer.values) for layer in cache.layers]
    assert cache_bytes(legacy) == cache_bytes(cache)


@torch.inference_mode()
def test_a_model_without_gqa_and_the_serving_batch():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval()
    cache = gpt2(torch.randint(0, 64, (2, 5)), use_cache=True).past_key_values
    assert cache_bytes(cache) == KVShape.of(gpt2.config, torch.float32).bytes(5, 2)
    # The server's left-padded batch stores padding too: rows x the longest prompt.
    model = tiny_llama()
    prefill = Prefill(model, [[1, 2, 3, 4, 5], [6, 7]], pad_id=0, chunk_tokens=2)
    assert cache_bytes(prefill.cache) == 0  # no layer filled before the first chunk
    while prefill.step() is None:
        pass
    batch = RunningBatch(model)
    batch.join(prefill)
    assert cache_bytes(batch.cache) == KVShape.of(model.config, torch.float32).bytes(5, 2)
