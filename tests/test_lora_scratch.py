"""LoRA from scratch (lmref.training.lora_scratch) against peft's LoRA Linear on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from lmref.training.lora_scratch import LoraLinear, from_peft

pytestmark = pytest.mark.unit


def peft_layer(r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> nn.Module:
    """A peft LoRA Linear (48 -> 32) with B random, so the update is not zero."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(48, 32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["proj"],
        use_rslora=rslora,
        init_lora_weights=False,  # B random: a test at B = 0 could not see a wrong scale
    )
    return inject_adapter_in_model(config, holder).proj


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(4, 8, False), (16, 8, False), (16, 8, True)])
def test_forward_equals_peft_on_the_same_weights(r, alpha, rslora):
    layer = peft_layer(r, alpha, rslora=rslora).eval()
    scratch = from_peft(layer, rslora=rslora).eval()
    assert scratch.scale == pytest.approx(layer.scaling["default"])
    assert scratch.scale == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r)
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        expected = layer(x)
        assert (expected - layer.base_layer(x)).abs().max() > 1e-3  # the update matters
        torch.testing.assert_close(scratch(x), expected)
        # The update as one matrix: what merging adds to W, as peft computes it.
        torch.testing.assert_close(scratch.delta_weight(), layer.get_delta_weight("default"))


def test_dropout_draws_the_same_mask_as_peft_in_training():
    layer = peft_layer(8, 16, dropout=0.5).train()
    scratch = from_peft(layer).train()
    assert isinstance(scratch.dropout, nn.Dropout) and scratch.dropout.p == 0.5
    x = torch.randn(4, 48)
    torch.manual_seed(1)
    expected = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(scratch(x), expected)
    torch.manual_seed(2)  # another mask, another output: the dropout is really applied
    assert not torch.allclose(scratch(x), expected)


def test_a_new_layer_starts_as_the_frozen_base_and_trains_only_a_and_b():
    base = nn.Linear(48, 32)
    layer = LoraLinear(base, r=4, alpha=8, dropout=0.1)
    assert layer.A.weight.shape == (4, 48) and layer.B.weight.shape == (32, 4)
    assert torch.count_nonzero(layer.B.weight) == 0 and torch.count_nonzero(layer.A.weight) > 0
    x = torch.randn(6, 48)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: step 0 is the base, dropout or not
    layer(x).pow(2).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["A.weight", "B.weight"]
    assert base.weight.grad is None and layer.B.weight.grad is not None
    with torch.no_grad():
        layer.B.weight.normal_()
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 4  # rank <= r
    with pytest.raises(ValueError, match="rank"):
        LoraLinear(base, r=0, alpha=8)
