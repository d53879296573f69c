"""Knowledge distillation for causal LMs: a teacher's soft targets in the training loss.

Hinton et al. (2015): a small *student* learns more from a big *teacher*'s whole next-token
distribution than from the one correct token alone. The distribution says which wrong answers
are nearly right ("4 pm" after "16:00" is close; "apple" is not). The loss per label token is

    alpha * T^2 * KL(p_teacher^T || p_student^T)  +  (1 - alpha) * CE(student, label)

where ``p^T = softmax(logits / T)``:

- ``temperature`` T > 1 flattens both distributions so the small probabilities of the wrong
  tokens (the "dark knowledge") weigh in the KL; T = 1 compares the distributions as they are.
  Gradients of the softened KL shrink as 1 / T^2, hence the T^2 factor: it keeps the KL term's
  scale against the CE term when T changes (as in the paper).
- ``alpha`` (the blend) weighs the teacher against the labels: 0 is plain cross-entropy, 1 is
  pure distillation (no labels needed at all: any text the teacher reads becomes training data).

The KL is *forward* KL(teacher || student): the student is pushed to cover every token the
teacher gives mass to (mean-seeking), the standard choice for distilling on fixed data
(reverse KL, as in MiniLLM, is mode-seeking and needs student samples).

Positions that do not count in ``lmref.core.losses`` (label ``IGNORE_INDEX``: the prompt of an
instruction; padding under the attention mask) count for neither term: the student learns from
the teacher exactly where it would learn from the labels. The label shift, the ignore index and
the cross-entropy term are ``lmref.core.losses``'s. Each loss is a **sum over label tokens plus
the token count**, the contract of ``lmref.core.losses.causal_lm_loss_sum``, so gradient
accumulation stays exactly token-weighted when this loss replaces it in the training loop
(``train(..., loss_fn=...)``).

**Cached teacher targets.** The teacher's forward pass on every batch can cost as much as the
student's step. When the training rows are fixed (e.g. instructions labelled once by the
teacher, as in sequence-level KD, Kim & Rush 2016), ``teacher_topk`` computes the teacher's k
largest logits at each label position once; ``TopKCollator`` carries them with each row and
``cached_distillation_loss`` uses them instead of a teacher. The KL then runs over those k
tokens: the teacher's distribution renormalised over its top k, against the student's
log-probabilities of the same tokens (full softmax). With k = the vocabulary it is the full KL.

Memory: the float32 log-softmax of both models, their probabilities and the KL terms are each
(tokens x vocabulary). Only label positions are gathered, and they are processed
``chunk_tokens`` rows at a time under activation checkpointing, so those temporaries exist for
one chunk at a time in forward *and* backward (a fused kernel, e.g. Liger's, goes further and
never materialises the logits).

Usage::

    from lmref.training.distillation import DistillationConfig, distillation_loss
    from lmref.training.loop import train

    loss_fn = distillation_loss(teacher, DistillationConfig(temperature=2.0, alpha=0.5))
    train(student, data["train"], config, collate_fn=collator, loss_fn=loss_fn)

    # or the teacher's top-k logits computed once and stored with the rows:
    rows = with_teacher_topk(teacher, data["train"], collator, k=16)
    train(student, rows, config, collate_fn=TopKCollator(collator),
          loss_fn=cached_distillation_loss(DistillationConfig(temperature=1.0, alpha=0.5)))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.checkpoint import checkpoint

from lmref.core.losses import IGNORE_INDEX, nll_sum, shift_labels


@dataclass
class DistillationConfig:
    """How much the teacher counts and how soft its targets are (see the module docstring)."""

    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the cross-entropy
    chunk_tokens: int = 1024  # label positions per chunk of vocabulary-sized float32 math

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, not {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], not {self.alpha!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, not {self.chunk_tokens!r}")


@dataclass(frozen=True)
class TopKTargets:
    """A teacher's k largest logits at each label position of a batch, one row per position in
    ``distillation_loss_sum``'s order (batch row by batch row, left to right)."""

    values: torch.Tensor  # (positions, k) logits, float
    indices: torch.Tensor  # (positions, k) token ids, long


def _chunk_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    teacher_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed blended loss of one chunk of label positions (rows of vocabulary logits; the
    teacher's rows are its top-k logits when ``teacher_indices`` names their tokens)."""
    student = student.float()
    total = student.new_zeros(())
    if alpha > 0:
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        if teacher_indices is not None:  # the student's log-probabilities of the teacher's top k
            log_p_student = log_p_student.gather(-1, teacher_indices)
        log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
        # KL(t || s) = sum_v p_t (log p_t - log p_s); log_target avoids exp(log(.)) round trips.
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
        total = total + alpha * temperature**2 * kl
    if alpha < 1:
        total = total + (1 - alpha) * nll_sum(student, targets)
    return total


def distillation_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTargets,
    labels: torch.Tensor,
    config: DistillationConfig | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blended KD loss summed over label tokens, and how many there were.

    ``student_logits`` and ``teacher_logits`` are (batch, sequence, vocabulary) for the same
    inputs; ``labels`` (batch, sequence) are the input ids with ``IGNORE_INDEX`` where no loss
    counts, and ``attention_mask`` (0: padding) removes padded positions too. As in
    transformers, the logits at position i predict the label at i + 1 (labels are shifted here,
    by ``lmref.core.losses.shift_labels``). ``teacher_logits`` may instead be the teacher's
    ``TopKTargets`` at the label positions (``teacher_topk``).
    """
    config = config or DistillationConfig()
    sparse = isinstance(teacher_logits, TopKTargets)
    if not sparse and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the models need one tokenizer "
            "(same vocabulary size) and the same inputs"
        )
    if labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape[:2])}"
        )
    # Shift labels, not logits (slicing logits would copy the largest tensor of the step).
    targets = shift_labels(labels, attention_mask).flatten()
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    count = keep.numel()
    student_rows = student_logits.flatten(0, 1).index_select(0, keep)
    target_rows = targets.index_select(0, keep)
    if sparse:
        if teacher_logits.values.shape[0] != count:
            raise ValueError(
                f"{teacher_logits.values.shape[0]} cached teacher positions for {count} label "
                "positions: the targets were computed on other rows or another tokenization"
            )
        teacher_rows, teacher_ids = teacher_logits.values.detach(), teacher_logits.indices
    else:
        teacher_rows = teacher_logits.flatten(0, 1).index_select(0, keep).detach()
        teacher_ids = None
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, count, config.chunk_tokens):
        part = slice(start, start + config.chunk_tokens)
        args = (
            student_rows[part],
            teacher_rows[part],
            target_rows[part],
            config.temperature,
            config.alpha,
            None if teacher_ids is None else teacher_ids[part],
        )
        if torch.is_grad_enabled() and student_rows.requires_grad:
            # Recompute the chunk's softmaxes in backward instead of keeping them for all chunks.
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    return total, torch.tensor(count, device=student_logits.device)


def distillation_loss(
    teacher: torch.nn.Module,
    config: DistillationConfig | None = None,
) -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]:
    """A ``loss_fn(model, batch) -> (loss_sum, label_tokens)`` for ``lmref.training.loop.train``.

    The teacher runs in eval mode without gradients on the same batch; it must share the
    student's tokenizer. Put it on the student's device (and, on a GPU, in bf16: it only runs
    forward passes).
    """
    config = config or DistillationConfig()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        labels = batch.get("labels", batch["input_ids"])
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        student_logits = model(**inputs).logits
        return distillation_loss_sum(
            student_logits, teacher_logits, labels, config, batch.get("attention_mask")
        )

    return loss_fn


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, batch: dict, k: int) -> TopKTargets:
    """The teacher's ``k`` largest next-token logits at ``batch``'s label positions (the positions
    ``distillation_loss_sum`` scores, in its order): what ``cached_distillation_loss`` needs."""
    device = next(teacher.parameters()).device
    inputs = {n: batch[n].to(device) for n in ("input_ids", "attention_mask") if n in batch}
    logits = teacher.eval()(**inputs).logits
    labels = batch.get("labels", batch["input_ids"]).to(device)
    targets = shift_labels(labels, inputs.get("attention_mask")).flatten()
    rows = logits.flatten(0, 1)[targets != IGNORE_INDEX].float()
    top = rows.topk(min(k, rows.shape[-1]), dim=-1)
    return TopKTargets(top.values.cpu(), top.indices.cpu())


def with_teacher_topk(
    teacher: torch.nn.Module, dataset, collate_fn: Callable, k: int = 16, batch_size: int = 64
):
    """``dataset`` (rows with ``input_ids`` and ``labels``) plus the teacher's top-k logits of each
    row as columns ``teacher_values`` and ``teacher_indices`` (label positions x k), computed
    once, for ``TopKCollator`` and ``cached_distillation_loss``."""
    values, indices = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_fn(rows)
        top = teacher_topk(teacher, batch, k)
        counts = (shift_labels(batch["labels"], batch.get("attention_mask")) != IGNORE_INDEX).sum(1)
        values += [v.tolist() for v in top.values.split(counts.tolist())]
        indices += [i.tolist() for i in top.indices.split(counts.tolist())]
    # from_dict, not add_column: add_column hashes the new column for its fingerprint (seconds).
    columns = {**dataset.to_dict(), "teacher_values": values, "teacher_indices": indices}
    return Dataset.from_dict(columns)


class TopKCollator:
    """Wraps a collator: the batch it makes, plus the rows' cached ``teacher_values`` and
    ``teacher_indices`` stacked in ``distillation_loss_sum``'s order of label positions."""

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collate_fn(
            [{k: v for k, v in r.items() if not k.startswith("teacher_")} for r in rows]
        )
        for name, dtype in (("teacher_values", torch.float32), ("teacher_indices", torch.long)):
            batch[name] = torch.cat([torch.tensor(r[name], dtype=dtype) for r in rows])
        return batch


def cached_distillation_loss(
    config: DistillationConfig | None = None,
) -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]:
    """``distillation_loss`` without a teacher: its top-k logits come with the batch
    (``TopKCollator`` over rows of ``with_teacher_topk``)."""
    config = config or DistillationConfig()

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch.get("attention_mask")
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        teacher = TopKTargets(batch["teacher_values"], batch["teacher_indices"])
        return distillation_loss_sum(logits, teacher, batch["labels"], config, mask)

    return loss_fn


@torch.no_grad()
def agreement(
    student: torch.nn.Module, teacher: torch.nn.Module, batch: dict, temperature: float = 1.0
) -> dict:
    """How close the student is to its teacher on a batch's label positions.

    Returns the mean KL(teacher || student) per label token at ``temperature`` and the share of
    positions where both models' most likely next token agree.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    labels = batch.get("labels", batch["input_ids"])
    s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
    config = DistillationConfig(temperature=temperature, alpha=1.0)
    kl_sum, count = distillation_loss_sum(
        s_logits, t_logits, labels, config, batch.get("attention_mask")
    )
    mask = shift_labels(labels, batch.get("attention_mask")) != IGNORE_INDEX
    same = (s_logits.argmax(-1) == t_logits.argmax(-1)) & mask
    n = max(int(count), 1)
    # The loss carries T^2; undo it to report the plain KL at this temperature.
    return {
        "kl_per_token": float(kl_sum) / temperature**2 / n,
        "top1_agreement": int(same.sum()) / n,
        "tokens": int(count),
    }
