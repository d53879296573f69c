"""Model presets: build a small randomly initialised model from a named shape, and report its size.

The course trains its own base model (the ``tiny`` preset) so that nothing is downloaded. The
initialisation draws from a private generator seeded with ``seed``: the same seed gives the same
weights, and the caller's global RNG state is left as it was (a notebook's later sampling does
not depend on whether it built a model first).

Usage::

    from lmref.models.presets import PRESETS, build_model, model_report

    model = build_model("tiny", vocab_size=4096)          # random init, Llama-shaped, ~2.4M params
    print(model_report(model))                            # parameters, bytes, training memory estimate
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)


@dataclass(frozen=True)
class ModelPreset:
    """A model shape. ``arch`` is "llama" or "gpt2"; sizes follow the Llama config names."""

    arch: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool = True


PRESETS: dict[str, ModelPreset] = {
    # Trains on 2 CPU cores in minutes; GQA (6 query heads share 2 key/value heads) like Llama 3.
    "tiny": ModelPreset("llama", 192, 4, 6, 2, 512, 512, 4096),
    "tiny-gpt2": ModelPreset("gpt2", 192, 4, 6, 6, 768, 512, 4096),
    # GPU shapes for the benchmarks: GPT-2 small, and the TinyLlama 1.1B shape.
    "gpt2-124m": ModelPreset("gpt2", 768, 12, 12, 12, 3072, 1024, 50257),
    "llama-1b": ModelPreset("llama", 2048, 22, 32, 4, 5632, 2048, 32000, tie_word_embeddings=False),
}


def build_model(
    preset: str = "tiny", vocab_size: int | None = None, seed: int = 0, **overrides
) -> PreTrainedModel:
    """A randomly initialised model of a named shape; ``overrides`` replace config fields.

    The weights are those ``torch.manual_seed(seed)`` before construction gives (as before), but
    drawn inside ``torch.random.fork_rng``, so the caller's CPU and CUDA RNG states are unchanged.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    vocab_size = vocab_size or p.vocab_size
    if p.arch == "llama":
        fields = dict(
            vocab_size=vocab_size,
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_hidden_layers=p.num_hidden_layers,
            num_attention_heads=p.num_attention_heads,
            num_key_value_heads=p.num_key_value_heads,
            max_position_embeddings=p.max_position_embeddings,
            tie_word_embeddings=p.tie_word_embeddings,
        )
        make = lambda: LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))  # noqa: E731
    else:
        fields = dict(
            vocab_size=vocab_size,
            n_embd=p.hidden_size,
            n_layer=p.num_hidden_layers,
            n_head=p.num_attention_heads,
            n_inner=p.intermediate_size,
            n_positions=p.max_position_embeddings,
            tie_word_embeddings=p.tie_word_embeddings,
        )
        make = lambda: GPT2LMHeadModel(GPT2Config(**{**fields, **overrides}))  # noqa: E731
    # transformers' init functions draw from the global generator (no generator argument), so
    # the global state is forked: seeded inside, restored on exit. CUDA states are forked when
    # CUDA is already initialised; fork_rng would otherwise initialise it here (slow, and
    # unsafe before a fork).
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return make()


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once each (tied embeddings are one tensor)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_report(model: torch.nn.Module) -> dict:
    """Parameter counts and memory: weights as stored, and a rule-of-thumb for AdamW training.

    Training with AdamW in fp32 holds weights + gradients + two moments = 16 bytes a trainable
    parameter (mixed precision keeps fp32 master weights, so it is no smaller), before activations.
    """
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "parameters": total,
        "trainable_parameters": trainable,
        "trainable_share": trainable / total if total else 0.0,
        "weight_mb": weight_bytes / 2**20,
        "adamw_training_state_mb": 16 * trainable / 2**20,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
