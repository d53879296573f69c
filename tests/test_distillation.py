"""lmref.training.distillation: the loss against a hand computation, its reduction to cross-entropy,
masking, chunking, and a real distillation run through the one training loop."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from lmref.core.losses import causal_lm_loss_sum
from lmref.models.presets import build_model
from lmref.training.config import TrainingConfig
from lmref.training.distillation import (
    DistillationConfig,
    agreement,
    distillation_loss,
    distillation_loss_sum,
)
from lmref.training.loop import train

pytestmark = pytest.mark.unit

VOCAB = 128


def softmax(xs: list[float], t: float) -> list[float]:
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


def test_loss_matches_a_hand_computation():
    # One sequence of 3 positions over a vocabulary of 3. Logits at position i predict the label
    # at i + 1: position 0 -> 0, position 1 -> 2; position 2 has no next label, and label 0 (a
    # prompt token, -100) is never a target.
    student = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [2.0, -1.0, 0.0]]
    teacher = [[0.0, 1.0, 0.0], [3.0, 0.0, -2.0], [0.0, 0.0, 1.0]]
    labels = [-100, 0, 2]  # next-token targets: pos 0 -> 0, pos 1 -> 2, pos 2 -> none
    t, alpha = 2.0, 0.3
    expected = 0.0
    for pos, target in ((0, 0), (1, 2)):
        ps, pt = softmax(student[pos], t), softmax(teacher[pos], t)
        kl = sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
        ce = -math.log(softmax(student[pos], 1.0)[target])
        expected += alpha * t * t * kl + (1 - alpha) * ce
    loss, count = distillation_loss_sum(
        torch.tensor([student]),
        torch.tensor([teacher]),
        torch.tensor([labels]),
        DistillationConfig(temperature=t, alpha=alpha),
    )
    assert int(count) == 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_blend_zero_is_causal_lm_loss_sum():
    torch.manual_seed(0)
    model = build_model(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    teacher = build_model(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        seed=1,
    )
    ids = torch.randint(0, VOCAB, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    want_loss, want_count = causal_lm_loss_sum(model, batch)
    got_loss, got_count = distillation_loss(teacher, DistillationConfig(1.0, 0.0))(model, batch)
    assert int(got_count) == int(want_count) == 3 * 8 - 3
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    # and the teacher matters once alpha > 0
    mixed, _ = distillation_loss(teacher, DistillationConfig(1.0, 0.5))(model, batch)
    assert abs(mixed.item() - want_loss.item()) > 1e-3


def test_masked_positions_do_not_count_and_chunks_change_nothing():
    torch.manual_seed(0)
    student = torch.randn(2, 7, 50, requires_grad=True)
    teacher = torch.randn(2, 7, 50)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    config = DistillationConfig(temperature=3.0, alpha=0.7, chunk_tokens=1000)
    whole, n = distillation_loss_sum(student, teacher, labels, config)
    (grad_whole,) = torch.autograd.grad(whole, student)
    chunked, n2 = distillation_loss_sum(
        student, teacher, labels, DistillationConfig(3.0, 0.7, chunk_tokens=3)
    )
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    assert int(n) == int(n2) == 2 * 6 - 2
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)
    # Logits predicting a masked label get no gradient; changing the teacher there changes nothing.
    assert grad_whole[0, :2].abs().sum() == 0 and grad_whole[:, -1].abs().sum() == 0
    other_teacher = teacher.clone()
    other_teacher[0, :2] += 10
    same, _ = distillation_loss_sum(student, other_teacher, labels, config)
    torch.testing.assert_close(same, whole)


def test_student_equal_to_teacher_has_zero_kl():
    logits = torch.randn(1, 5, 20)
    labels = torch.randint(0, 20, (1, 5))
    loss, _ = distillation_loss_sum(logits, logits.clone(), labels, DistillationConfig(4.0, 1.0))
    assert abs(loss.item()) < 1e-5


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="temperature"):
        DistillationConfig(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationConfig(alpha=1.5)
    with pytest.raises(ValueError, match="tokenizer"):
        distillation_loss_sum(
            torch.zeros(1, 4, 10), torch.zeros(1, 4, 12), torch.zeros(1, 4).long()
        )


def test_distillation_through_the_training_loop_moves_student_towards_teacher(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict(
        {"input_ids": torch.randint(0, VOCAB, (64, 16), generator=g).tolist()}
    )
    teacher = build_model(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    student = build_model(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        seed=3,
    )
    batch = {"input_ids": torch.tensor(data[:16]["input_ids"])}
    before = agreement(student, teacher, batch)["kl_per_token"]
    config = TrainingConfig(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=10,
        disable_tqdm=True,
    )
    train(student, data, config, loss_fn=distillation_loss(teacher, DistillationConfig(2.0, 1.0)))
    after = agreement(student, teacher, batch)
    assert after["kl_per_token"] < 0.5 * before
    assert all(not p.requires_grad for p in teacher.parameters())
