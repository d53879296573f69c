"""Faster CPU inference: every linear layer's weight packed once for oneDNN, instead of per call.

On CPU, ``nn.Linear`` hands its weight to MKL's GEMM on every call, which re-blocks it each time
and, on AMD CPUs, runs a generic code path. Decode is a few rows against every weight of the
model, so this is where its time goes. oneDNN can pack (reorder) a weight once into the layout
its kernels read; ``pack_linears`` does that for every ``nn.Linear`` (and GPT-2's ``Conv1D``)
of an inference model. Measured on a 2-core AMD EPYC: the 211 linear layers of SmolLM2-135M
alone, weights read cold (the profile in ``benchmarks/results/serving_peer-cpu*.json``):

| rows x dtype | MKL (``nn.Linear``) | oneDNN packed |
|---|---|---|
| 1 x fp32 | 46.2 ms | 33.8 ms |
| 16 x fp32 | 76.1 ms | 48.7 ms |
| 1 x bf16 | 31.5 ms | 25.9 ms |
| 16 x bf16 | 37.0 ms | 27.4 ms |

Served (``python -m lmref.serve``, fp32, 16 clients) that is 183.0 instead of 124.1 tokens/s.
fp32 results equal ``nn.Linear``'s to rounding (greedy text unchanged in the tests).

Why private ops: the public road to these kernels is ``torch.compile`` with inductor's
``freezing``, which emits these same two ops, ``mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, for bf16 weights and for a batch size that varies
(``torch/_inductor/fx_passes/mkldnn_fusion.py``).
Measured here with a static cache and ``generate``, it made decode 1.22x faster but took 54 s
to compile and compiles again for each new batch shape, which a continuous batch has at every
join and leave. Calling the two ops directly gives the packing without the compile;
``packing_available(dtype)`` checks they exist and that this CPU has their kernels for the
dtype, and ``pack_linears`` changes nothing when not.

Inference only: the packed weight is not a parameter (no gradient, not in ``state_dict``),
and a weight tied to the embedding (``lm_head``) gets a packed copy of its own.

Usage::

    from lmref.serving.packed_linear import pack_linears

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    packed = pack_linears(model)      # how many layers were packed; 0 off CPU
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D


def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has oneDNN and the two ops ``PackedLinear`` uses, and this CPU
    has oneDNN's kernels for ``dtype``: bf16 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which
    an AMD EPYC without AVX-512 lacks (the reorder then raises instead of falling back)."""
    ops = torch.ops.mkldnn
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops._linear_pointwise, "binary")
    ):
        return False
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(ops._is_mkldnn_fp16_supported())
    return dtype == torch.float32


class PackedLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in oneDNN's own layout (CPU, inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = 16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # The batch-size hint picks the layout. Measured: a hint of 16 is as fast as 1 for one
        # row and 1.2-1.4x faster for 16 rows (fp32), so one layout serves decode at any load;
        # lmref.serving.fused_llama gives its largest matrices a hint of 1 (it says why).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().contiguous(), batch_hint
        )
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one call: oneDNN adds ``residual`` as its output is
        written (a "sum" post-op), equal to the two calls bit for bit (checked in the tests)."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


@torch.no_grad()
def pack_linears(model: torch.nn.Module) -> int:
    """Replace each ``nn.Linear``/``Conv1D`` of a CPU model in eval mode by a ``PackedLinear``.

    Returns how many were replaced: 0 when the model is not on CPU, or oneDNN or its kernels
    for the model's dtype are missing (``packing_available``): the model then runs as it was.
    Subclasses (bitsandbytes' 4-bit layers) are left alone; a model with adapters must be merged
    first (``merge_and_unload()``), as their layers wrap a plain ``nn.Linear``.
    """
    if model.training:
        raise ValueError("pack_linears is for inference: call model.eval() first")
    if getattr(model, "peft_config", None):
        raise ValueError(
            "pack_linears needs a plain model: merge the adapters first (model.merge_and_unload())"
        )
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or not packing_available(first.dtype):
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedLinear(child.weight, child.bias))
            elif type(child) is Conv1D:  # GPT-2 stores (in, out): transposed to (out, in)
                setattr(parent, name, PackedLinear(child.weight.t(), child.bias))
            else:
                continue
            count += 1
    return count
