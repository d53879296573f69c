"""Notebook 08's students: a smaller Llama shaped from the teacher's config, trained on the
instruction set by distillation from the teacher or on the labels alone.

Usage::

    from lmref.lab import distill_recipe
    from lmref.training.distillation import DistillationConfig

    student, run = distill_recipe.train_student(teacher, teacher_dir, config, DistillationConfig(2.0, 0.5))
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from lmref.lab.course import tokenized_instructions
from lmref.models.presets import build_model
from lmref.training.config import TrainingConfig, TrainResult
from lmref.training.distillation import DistillationConfig, distillation_loss
from lmref.training.loop import train


def build_student(
    teacher_dir: Path | str, width: float = 0.5, depth: float = 0.5, seed: int = 0
) -> torch.nn.Module:
    """A randomly initialised Llama of ``width`` x the teacher's hidden size (and heads, MLP) and
    ``depth`` x its layers, with the teacher's vocabulary and special tokens (same tokenizer)."""
    t = AutoConfig.from_pretrained(teacher_dir)
    heads = max(1, round(t.num_attention_heads * width))
    kv_heads = max(1, round(t.num_key_value_heads * width))
    head_dim = t.hidden_size // t.num_attention_heads
    return build_model(
        "tiny",
        vocab_size=t.vocab_size,
        seed=seed,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=max(1, round(t.num_hidden_layers * depth)),
        intermediate_size=int(t.intermediate_size * width),
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
    )


def train_student(
    teacher: torch.nn.Module | None,
    teacher_dir: Path | str,
    config: TrainingConfig,
    distill: DistillationConfig | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, TrainResult]:
    """A fresh student trained on the instruction set: distilled from ``teacher`` with
    ``distill``, or on the labels alone (plain cross-entropy) when ``distill`` is None."""
    student = build_student(teacher_dir, seed=seed).to(
        next(teacher.parameters()).device if teacher is not None else "cpu"
    )
    tokenized, collator = tokenized_instructions(str(teacher_dir))
    loss = {} if distill is None else {"loss_fn": distillation_loss(teacher, distill)}
    result = train(
        student,
        tokenized["train"],
        config,
        eval_dataset=tokenized["validation"],
        collate_fn=collator,
        **loss,
    )
    return student, result
