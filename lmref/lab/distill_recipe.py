"""Notebook 08's experiment: a student half the teacher's size, with a few hundred labelled
instructions, trained on those labels alone or distilled from the teacher, which also labels
instructions whose answers the student never gets.

The label-scarce setting (``LabelScarce``): the first ``labelled`` rows of the train split keep
their answers; the next ``unlabelled`` rows keep only their instructions. Plain cross-entropy
trains on the labelled rows. Distillation trains on the labelled rows plus the unlabelled
instructions answered by the teacher (greedy: sequence-level KD, Kim & Rush 2016), with the
teacher's top-k logits at every answer position cached once (``lmref.training.distillation``),
so a distillation step costs about what a plain one does. ``ValidationCurve`` records the
validation loss against steps and training seconds.

Usage::

    from lmref.lab import distill_recipe
    from lmref.training.distillation import DistillationConfig

    data = distill_recipe.label_scarce_data(teacher, tokenizer, raw["train"], LabelScarce())
    run = distill_recipe.train_student(data.distill_rows, collator, config, teacher_dir,
                                       val_rows, DistillationConfig(1.0, 0.5), seed=0)
    run.curve                                   # [{"step", "seconds", "validation loss"}, ...]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from transformers import AutoConfig, PreTrainedTokenizerBase

from lmref.data.instructions import InstructionCollator, format_prompt, tokenize_instructions
from lmref.evaluation.metrics import generate_text
from lmref.models.presets import build_model
from lmref.training.config import TrainingConfig, TrainResult
from lmref.training.distillation import (
    DistillationConfig,
    TopKCollator,
    cached_distillation_loss,
    distillation_loss,
    with_teacher_topk,
)
from lmref.training.loop import evaluate_loss, train


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


@dataclass
class LabelScarce:
    """How many train rows keep their answers, how many give the teacher only their instruction,
    and how much of the teacher's distribution is kept per answer position."""

    labelled: int = 300
    unlabelled: int = 2000
    top_k: int = 16
    max_new_tokens: int = 16  # longer than any answer in the set


@dataclass
class LabelScarceData:
    plain_rows: Dataset  # the labelled rows, tokenized: all plain cross-entropy gets
    distill_rows: Dataset  # labelled + teacher-answered rows, with the teacher's top-k logits
    teacher_correct: int  # teacher answers equal to the withheld ones (reported, never trained on)
    teacher_seconds: float  # generating the answers and caching the top-k logits, once


def label_scarce_data(
    teacher: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    raw_train: Dataset,
    setting: LabelScarce,
    collate_fn=None,
) -> LabelScarceData:
    """The two training sets of the comparison (see the module docstring). The train split is
    stratified and shuffled, so both prefixes hold every task equally."""
    collate_fn = collate_fn or InstructionCollator(tokenizer)
    if setting.labelled + setting.unlabelled > len(raw_train):
        raise ValueError(f"{setting} needs more than the {len(raw_train)} train rows")
    labelled = raw_train.select(range(setting.labelled))
    unlabelled = raw_train.select(range(setting.labelled, setting.labelled + setting.unlabelled))
    start = time.perf_counter()
    prompts = [format_prompt(x) for x in unlabelled["instruction"]]
    answers = [
        a.strip()
        for a in generate_text(
            teacher, tokenizer, prompts, max_new_tokens=setting.max_new_tokens, batch_size=64
        )
    ]
    correct = sum(a == b.strip() for a, b in zip(answers, unlabelled["answer"]))
    answered = unlabelled.remove_columns("answer").add_column("answer", answers)
    plain_rows = tokenize_instructions(labelled, tokenizer)
    both = concatenate_datasets([plain_rows, tokenize_instructions(answered, tokenizer)])
    distill_rows = with_teacher_topk(teacher, both, collate_fn, k=setting.top_k)
    return LabelScarceData(plain_rows, distill_rows, correct, time.perf_counter() - start)


class ValidationCurve:
    """A ``train`` callback: the validation loss every ``every`` steps, against the step and the
    seconds of training so far (its own evaluations are not counted), and a copy of the weights
    at the best validation loss (early stopping: a choice made on validation)."""

    def __init__(self, model: torch.nn.Module, eval_dataset, collate_fn, every: int) -> None:
        self.model, self.eval_dataset, self.collate_fn = model, eval_dataset, collate_fn
        self.every = every
        self.points: list[dict] = []
        self.best_step, self.best_state = 0, None
        self.seconds, self.last = 0.0, time.perf_counter()

    def __call__(self, step: int, metrics: dict) -> None:
        if step % self.every:
            return
        self.seconds += time.perf_counter() - self.last
        loss = evaluate_loss(self.model, self.eval_dataset, 64, self.collate_fn)
        if not self.points or loss < min(p["validation loss"] for p in self.points):
            self.best_step = step
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.points.append({"step": step, "seconds": self.seconds, "validation loss": loss})
        self.last = time.perf_counter()


@dataclass
class StudentRun:
    model: torch.nn.Module  # at its best validation step (``best_step``)
    result: TrainResult  # of the whole run
    curve: list[dict]
    best_step: int


def train_student(
    rows: Dataset,
    collate_fn,
    config: TrainingConfig,
    teacher_dir: Path | str,
    eval_dataset: Dataset,
    distill: DistillationConfig | None = None,
    seed: int = 0,
    teacher: torch.nn.Module | None = None,
    curve_every: int = 20,
) -> StudentRun:
    """A fresh student (seed ``seed`` for its initialisation and data order) trained on ``rows``:
    plain cross-entropy when ``distill`` is None; else distilled from ``teacher`` run on every
    batch or, without one, from the top-k logits cached in ``rows`` (``label_scarce_data``).
    The validation loss on ``eval_dataset`` is recorded every ``curve_every`` steps, and the
    student returned is the one of the best of those steps."""
    student = build_student(teacher_dir, seed=seed)
    if teacher is not None:
        student = student.to(next(teacher.parameters()).device)
    if distill is None:
        extra, collate = {}, collate_fn
    elif teacher is not None:
        extra, collate = {"loss_fn": distillation_loss(teacher, distill)}, collate_fn
    else:
        extra, collate = {"loss_fn": cached_distillation_loss(distill)}, TopKCollator(collate_fn)
    curve = ValidationCurve(student, eval_dataset, collate_fn, curve_every)
    result = train(
        student, rows, replace(config, seed=seed), collate_fn=collate, callbacks=[curve], **extra
    )
    if curve.best_state is not None:
        student.load_state_dict(curve.best_state)
    return StudentRun(student, result, curve.points, curve.best_step)
