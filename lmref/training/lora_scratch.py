"""LoRA from scratch: one adapted linear layer in plain PyTorch, to read next to peft's.

``LoraLinear`` wraps a frozen ``nn.Linear`` ``W`` and adds a rank-``r`` update (Hu et al., 2021)::

    y = W x + s * B(A(dropout(x)))      A: r x d_in (random),  B: d_out x r (zeros)

with ``s = alpha / r`` (the paper), or ``s = alpha / sqrt(r)`` with ``rslora=True``
(Kalajdzievski, 2023; peft's ``use_rslora``). ``B`` starts at zero, so the layer starts as
``W`` exactly; ``A`` starts as peft initialises it (Kaiming-uniform). ``delta_weight`` is the
update ``s * B A`` as one matrix: what merging adds to ``W``.

``from_peft`` copies a peft LoRA layer (``peft.tuners.lora.Linear``: its frozen ``base_layer``
and its ``lora_A`` / ``lora_B``) into a ``LoraLinear``, so the two forwards can be compared on
the same weights; ``tests/test_lora_scratch.py`` holds them equal.

Usage::

    from lmref.training.lora_scratch import LoraLinear, from_peft

    layer = LoraLinear(torch.nn.Linear(192, 192), r=8, alpha=16)
    y = layer(x)                                   # W x + (16 / 8) * B(A(x)); equals W x at init
    scratch = from_peft(peft_model.base_model.model.model.layers[0].self_attn.q_proj)
    torch.testing.assert_close(scratch(x), peft_layer(x))
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update scaled by ``alpha / r``."""

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base.requires_grad_(False)  # W (and its bias) never get a gradient
        self.A = nn.Linear(base.in_features, r, bias=False)  # weight: r x d_in
        self.B = nn.Linear(r, base.out_features, bias=False)  # weight: d_out x r
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))  # peft's init of A
        nn.init.zeros_(self.B.weight)  # B = 0: the update starts at zero
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.B(self.A(self.dropout(x)))

    def delta_weight(self) -> torch.Tensor:
        """The update as one d_out x d_in matrix, ``s * B @ A``: rank <= r."""
        return self.scale * self.B.weight @ self.A.weight


def from_peft(layer: nn.Module, adapter: str = "default", rslora: bool = False) -> LoraLinear:
    """A ``LoraLinear`` holding copies of a peft LoRA layer's ``W``, ``A``, ``B`` and dropout rate.

    The scale is computed here from peft's ``r`` and ``lora_alpha`` (not copied), so a
    comparison also checks the scaling rule; pass ``rslora`` as the adapter was configured.
    """
    base = layer.base_layer
    copy = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    copy.load_state_dict(base.state_dict())
    dropout = layer.lora_dropout[adapter]
    scratch = LoraLinear(
        copy,
        r=layer.r[adapter],
        alpha=layer.lora_alpha[adapter],
        dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        rslora=rslora,
    )
    with torch.no_grad():
        scratch.A.weight.copy_(layer.lora_A[adapter].weight)
        scratch.B.weight.copy_(layer.lora_B[adapter].weight)
    return scratch.to(base.weight.device)
