"""The one-row matvec kernel (lmref.serving.matvec) against torch's own matmul: every shape,
the residual form, bad input, and the fused decode step that uses it, on this CPU's vector
width (and, marked slow, the AVX2 build on a CPU that also has AVX-512)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmref.serving.batching import Prefill, RunningBatch
from lmref.serving.fused_llama import FusedLlama
from lmref.serving.matvec import OneRowLinear, matvec_kernel, vector_width
from lmref.serving.packed_linear import PackedLinear, packing_available
from lmref.serving.slot_batch import SlotBatch

unit = pytest.mark.unit
needs_kernel = pytest.mark.skipif(vector_width() is None, reason="neither AVX-512 nor AVX2")
# out x in: a row left over after the blocks of 4 (5, 7, 9 rows), columns past the last vector
# (17, 67, 9), fewer columns than a vector (3), one row, and SmolLM2's shapes.
SHAPES = [(1, 1), (5, 67), (7, 3), (9, 9), (4, 16), (3, 17), (960, 576), (576, 1536)]


def kernel_for(width: str | None = None):
    kernel = matvec_kernel(width)
    assert kernel is not None, "the kernel did not build: see the log of lmref.serving.matvec"
    return kernel


def check_shapes(kernel) -> None:
    torch.manual_seed(0)
    for out, inp in SHAPES:
        weight, x, residual = torch.randn(out, inp), torch.randn(1, inp), torch.randn(1, out)
        expected = x.double() @ weight.double().T  # the exact sum, against which both round
        tolerance = (
            4 * torch.finfo(torch.float32).eps * (x.abs().double() @ weight.abs().double().T)
        )
        for got, want in ((kernel.matvec(x, weight), expected),
                          (kernel.matvec(x, weight, residual), expected + residual.double())):  # fmt: skip
            assert got.shape == (1, out) and got.dtype == torch.float32
            assert ((got.double() - want).abs() <= tolerance + 1e-6).all(), (out, inp)


@unit
@needs_kernel
def test_the_kernel_equals_the_exact_product_to_float_rounding_at_every_shape():
    check_shapes(kernel_for())


@unit
@needs_kernel
def test_bad_input_is_refused_by_name():
    kernel = kernel_for()
    weight = torch.randn(8, 16)
    cases = [
        (torch.randn(1, 15), weight, "16 values"),
        (torch.randn(2, 16), weight, "one contiguous fp32 row"),
        (torch.randn(1, 16).double(), weight, "fp32 row"),
        (torch.randn(1, 16), torch.randn(16, 8).T, "contiguous fp32 (out, in)"),
    ]
    for x, w, says in cases:
        with pytest.raises(RuntimeError, match=says.replace("(", r"\(").replace(")", r"\)")):
            kernel.matvec(x, w)
    with pytest.raises(RuntimeError, match="residual"):
        kernel.matvec(torch.randn(1, 16), weight, torch.randn(1, 7))


@unit
@needs_kernel
@pytest.mark.skipif(not packing_available(), reason="oneDNN packing")
def test_one_row_goes_through_the_kernel_and_more_rows_through_onednn():
    kernel = kernel_for()
    weight = torch.randn(40, 24)
    linear, packed = OneRowLinear(weight, kernel), PackedLinear(weight, None, 16)
    assert (linear.out_features, linear.in_features) == (40, 24)
    one, three, residual = torch.randn(1, 24), torch.randn(3, 24), torch.randn(3, 40)
    torch.testing.assert_close(linear(one), kernel.matvec(one, weight), rtol=0, atol=0)
    torch.testing.assert_close(linear(three), packed(three), rtol=0, atol=0)
    torch.testing.assert_close(linear.add_to(residual, three), packed.add_to(residual, three))
    torch.testing.assert_close(linear.add_to(residual[:1], one), residual[:1] + one @ weight.T)


@unit
@needs_kernel
@pytest.mark.skipif(not packing_available(), reason="oneDNN packing")
def test_one_row_decode_with_the_kernel_gives_the_forward_logits(monkeypatch):
    # 40 columns: two AVX-512 vectors and 8 past them; 36 and 76 rows: blocks of 4 and none left
    # over, 116 (q, k and v) and 150 (the vocabulary) too.
    config = LlamaConfig(vocab_size=150, hidden_size=40, intermediate_size=76,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    fused = FusedLlama.of(model)
    assert isinstance(fused.layers[0].qkv, OneRowLinear) and isinstance(fused.lm_head, OneRowLinear)
    monkeypatch.setenv("LMREF_MATVEC", "0")  # the switch: oneDNN for every row count
    assert isinstance(FusedLlama.of(model).layers[0].qkv, PackedLinear)
    generic, slots = RunningBatch(model), SlotBatch(model, fused)
    for batch in (generic, slots):
        prefill = Prefill(model, [[5, 9, 14, 3]], pad_id=0)
        prefill.step()
        batch.join(prefill)
    token = 7
    for _ in range(6):  # one row: every decode matmul is the kernel's
        expected, got = generic.step([token]), slots.step([token])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        token = int(expected.argmax())


@pytest.mark.slow  # a second build (about 20 s)
@pytest.mark.skipif(vector_width() is None, reason="no AVX2")
def test_the_avx2_build_gives_the_same_products():
    check_shapes(kernel_for("avx2"))
