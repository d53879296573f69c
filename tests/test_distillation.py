"""lmref.training.distillation: the loss against a hand computation, its reduction to cross-entropy,
masking, chunking, cached top-k teacher targets against the teacher on the fly, a real
distillation run through the one training loop, and notebook 08's validation curve."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from lmref.core.losses import causal_lm_loss_sum
from lmref.models.presets import build_model
from lmref.training.config import TrainingConfig
from lmref.training.distillation import (
    DistillationConfig,
    TopKCollator,
    TopKTargets,
    agreement,
    cached_distillation_loss,
    distillation_loss,
    distillation_loss_sum,
    with_teacher_topk,
)
from lmref.training.loop import evaluate_loss, train

pytestmark = pytest.mark.unit

VOCAB = 128


def one_layer_model(seed: int = 0):
    """A one-layer model over ``VOCAB`` tokens: enough to check a loss, seeded."""
    return build_model(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        seed=seed,
    )


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
    model = one_layer_model()
    teacher = one_layer_model(seed=1)
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
    student = one_layer_model(seed=3)
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


def pad_collate(rows: list[dict]) -> dict:
    """Right-pad rows of different lengths: input_ids with 0, labels with -100, a mask."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = (
            torch.tensor(r["input_ids"]),
            torch.tensor(r["labels"]),
            1,
        )
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def prompt_answer_rows(n: int, seed: int = 0) -> datasets.Dataset:
    """Rows of 6-11 tokens whose first 3 (a "prompt") carry no label."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": []}
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g)
        rows["input_ids"].append(ids.tolist())
        rows["labels"].append([-100] * 3 + ids[3:].tolist())
    return datasets.Dataset.from_dict(rows)


def test_top_k_over_the_whole_vocabulary_is_the_dense_loss():
    torch.manual_seed(0)
    student = torch.randn(2, 6, 30, requires_grad=True)
    teacher = torch.randn(2, 6, 30)
    labels = torch.randint(0, 30, (2, 6))
    labels[1, :2] = -100
    config = DistillationConfig(temperature=2.0, alpha=0.6, chunk_tokens=4)
    dense, n = distillation_loss_sum(student, teacher, labels, config)
    keep = (F.pad(labels[:, 1:], (0, 1), value=-100) != -100).flatten()
    top = teacher.flatten(0, 1)[keep].topk(30, dim=-1)
    sparse, n2 = distillation_loss_sum(
        student, TopKTargets(top.values, top.indices), labels, config
    )
    assert int(n) == int(n2) == 2 * 5 - 1
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(
        torch.autograd.grad(sparse, student)[0], torch.autograd.grad(dense, student)[0]
    )
    # Fewer tokens: a KL over the teacher's top k, still >= 0, and another number.
    top4 = teacher.flatten(0, 1)[keep].topk(4, dim=-1)
    kl4, _ = distillation_loss_sum(
        student, TopKTargets(top4.values, top4.indices), labels, DistillationConfig(2.0, 1.0)
    )
    assert kl4.item() > 0 and abs(kl4.item() - dense.item()) > 1e-3
    with pytest.raises(ValueError, match="cached teacher positions"):
        distillation_loss_sum(student, TopKTargets(top.values[1:], top.indices[1:]), labels)


def test_cached_top_k_through_the_collator_equals_the_teacher_on_the_fly():
    teacher = one_layer_model(seed=1)
    student = one_layer_model(seed=2)
    data = prompt_answer_rows(10)
    cached = with_teacher_topk(teacher, data, pad_collate, k=VOCAB, batch_size=4)
    assert len(cached["teacher_values"][0]) == len(data[0]["input_ids"]) - 3  # answer tokens
    config = DistillationConfig(temperature=2.0, alpha=0.5)
    rows = [cached[i] for i in (7, 2, 5)]  # another batching than the cache's
    batch = TopKCollator(pad_collate)(rows)
    got, n = cached_distillation_loss(config)(student, batch)
    want, n2 = distillation_loss(teacher, config)(student, pad_collate(rows))
    assert int(n) == int(n2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_validation_curve_records_points_and_the_student_keeps_its_best_step(tmp_path):
    from lmref.lab.distill_recipe import ValidationCurve

    model = one_layer_model()
    train_rows, val_rows = prompt_answer_rows(32, seed=0), prompt_answer_rows(8, seed=1)
    curve = ValidationCurve(model, val_rows, pad_collate, every=5)
    config = TrainingConfig(
        output_dir=str(tmp_path),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=3e-2,  # high: the validation loss on random tokens goes up again
        disable_tqdm=True,
    )
    train(model, train_rows, config, collate_fn=pad_collate, callbacks=[curve])
    assert [p["step"] for p in curve.points] == [5, 10, 15, 20]
    seconds = [p["seconds"] for p in curve.points]
    assert seconds == sorted(seconds) and seconds[0] > 0
    best = min(curve.points, key=lambda p: p["validation loss"])
    assert curve.best_step == best["step"]
    model.load_state_dict(curve.best_state)
    restored = evaluate_loss(model, val_rows, 64, pad_collate)
    assert restored == pytest.approx(best["validation loss"], rel=1e-6)
