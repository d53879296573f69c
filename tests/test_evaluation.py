"""Perplexity on hand-computable cases, exact match and generation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmref.evaluation.metrics import exact_match, generate_text, perplexity

pytestmark = pytest.mark.unit


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token distribution is the same known one everywhere."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, t, -1))


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = FixedLogits(torch.zeros(50))
    rows = [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6, 7, 8]}]
    result = perplexity(model, rows, batch_size=1)
    assert result["tokens"] == 6  # 3 predicted tokens per row of 4
    assert result["perplexity"] == pytest.approx(50.0, rel=1e-12)


def test_perplexity_is_token_weighted_not_batch_averaged():
    # p(token 0) = 0.5, p(token 1) = 0.25: NLL ln2 and ln4.
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    model = FixedLogits(logits)
    rows = [
        {"input_ids": [0, 0, 0, 0], "labels": [-100, 0, 0, 0]},  # 3 tokens of ln 2
        {"input_ids": [1, 1, 1, 1], "labels": [-100, -100, -100, 1]},  # 1 token of ln 4
    ]
    collate = lambda rs: {k: torch.tensor([r[k] for r in rs]) for k in rs[0]}  # noqa: E731
    result = perplexity(model, rows, batch_size=1, collate_fn=collate)
    expected = (3 * math.log(2) + math.log(4)) / 4
    assert result["loss"] == pytest.approx(expected, rel=1e-7)  # the logits are float32
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-7)
    # Averaging the two batches' losses would give (ln2 + ln4) / 2 instead.
    assert result["loss"] != pytest.approx((math.log(2) + math.log(4)) / 2)


def test_large_losses_stay_finite():
    logits = torch.tensor([0.0, -300.0])  # token 1 has NLL ~300 nats: fp16 exp would overflow
    result = perplexity(FixedLogits(logits), [{"input_ids": [1, 1]}])
    assert math.isfinite(result["perplexity"]) and result["loss"] == pytest.approx(300, rel=1e-6)


def test_empty_evaluation_is_a_clear_error():
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(FixedLogits(torch.zeros(5)), [])


def test_generation_and_exact_match(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = ["The quick", "A much longer prompt with several words in it"]
    tiny_tokenizer.padding_side = "right"
    greedy = generate_text(model, tiny_tokenizer, prompts, max_new_tokens=6)
    assert greedy == generate_text(model, tiny_tokenizer, prompts, max_new_tokens=6)
    # Left padding inside a batch gives the same continuation as the prompt alone.
    assert greedy[0] == generate_text(model, tiny_tokenizer, prompts[:1], max_new_tokens=6)[0]
    assert tiny_tokenizer.padding_side == "right"  # restored after generating with left padding
    result = exact_match(model, tiny_tokenizer, prompts, [greedy[0], "not this"], max_new_tokens=6)
    assert result["hits"] == [True, False] and result["accuracy"] == 0.5
    assert str(result["score"]).startswith("50.0% [9.5-90.5%] (n=2)")  # two examples: wide
    with pytest.raises(ValueError, match="answers"):
        exact_match(model, tiny_tokenizer, prompts, ["one"])
