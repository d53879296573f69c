"""The matvec kernel (lmref.serving.matvec) against exact products: fp32 and int8 weights, every
shape, several rows, the residual form, bad input, a row's result alone and in a batch, and the
fused decode step that uses it, on this CPU's vector width (and, marked slow, the AVX2 build on a
CPU that also has AVX-512)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmref.serving.batching import Prefill, RunningBatch
from lmref.serving.fused_llama import FusedLlama, SmallLinear
from lmref.serving.matvec import (
    KERNEL_ROWS,
    FewRowsLinear,
    Int8Linear,
    matvec_kernel,
    vector_width,
)
from lmref.serving.packed_linear import PackedLinear, packing_available
from lmref.serving.slot_batch import SlotBatch

unit = pytest.mark.unit
needs_kernel = pytest.mark.skipif(vector_width() is None, reason="neither AVX-512 nor AVX2")
# out x in: a row left over after the blocks of 4 (5, 7, 9 rows), columns past the last vector
# (17, 67, 9), fewer columns than a vector (3), one row, and SmolLM2's shapes.
SHAPES = [(1, 1), (5, 67), (7, 3), (9, 9), (4, 16), (3, 17), (960, 576), (576, 1536)]
ROWS = [1, 2, 3, 4, 5, 9]  # rows of x: groups of 4 and 1 to 3 left over


def kernel_for(width: str | None = None):
    kernel = matvec_kernel(width)
    assert kernel is not None, "the kernel did not build: see the log of lmref.serving.matvec"
    return kernel


def check_shapes(kernel) -> None:
    torch.manual_seed(0)
    for (out, inp), rows in zip(SHAPES, ROWS * 2):
        weight, x, residual = torch.randn(out, inp), torch.randn(rows, inp), torch.randn(rows, out)
        expected = x.double() @ weight.double().T  # the exact sum, against which both round
        tolerance = (
            4 * torch.finfo(torch.float32).eps * (x.abs().double() @ weight.abs().double().T)
        )
        for got, want in ((kernel.matvec(x, weight), expected),
                          (kernel.matvec(x, weight, residual), expected + residual.double())):  # fmt: skip
            assert got.shape == (rows, out) and got.dtype == torch.float32
            assert ((got.double() - want).abs() <= tolerance + 1e-6).all(), (out, inp)


def int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded to int16 a row at a time as the kernel does (fp32 arithmetic, ties to even)."""
    largest = x.abs().amax(1, keepdim=True)
    inverse = torch.where(largest > 0, 32767 / largest, torch.zeros_like(largest))
    return (x * inverse).round(), largest / 32767


def check_int8_shapes(kernel) -> None:
    torch.manual_seed(0)
    for (out, inp), rows in zip(SHAPES, ROWS * 2):
        linear = Int8Linear(torch.randn(out, inp), kernel)
        x, residual = torch.randn(rows, inp), torch.randn(rows, out)
        quantized, x_scale = int16_rows(x)
        products = quantized.double() @ linear.weight.double().T  # exact integers
        expected = products * x_scale.double() * linear.scale.double()
        tolerance = (
            1e-6
            * (quantized.abs().double() @ linear.weight.abs().double().T)
            * (x_scale.double() * linear.scale.double())
        )
        for got, want in ((linear(x), expected),
                          (linear.add_to(residual, x), expected + residual.double())):  # fmt: skip
            assert got.shape == (rows, out) and got.dtype == torch.float32
            assert ((got.double() - want).abs() <= tolerance + 1e-6).all(), (out, inp)
        # Against the fp32 product with the dequantized weights: x's rounding to 15 bits only.
        dequantized = linear.weight.double() * linear.scale.double()[:, None]
        near = (x.double() @ dequantized.T - linear(x).double()).abs()
        assert (
            near <= x.abs().amax(1, keepdim=True).double() / 32767 * dequantized.abs().sum(1) + 1e-6
        ).all()


@unit
@needs_kernel
def test_the_kernel_equals_the_exact_product_to_float_rounding_at_every_shape():
    check_shapes(kernel_for())


@unit
@needs_kernel
def test_int8_weights_give_the_exact_integer_products_scaled():
    check_int8_shapes(kernel_for())


@unit
@needs_kernel
def test_int8_weights_are_rounded_per_output_row():
    weight = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -2.0]])
    linear = Int8Linear(weight, kernel_for())
    torch.testing.assert_close(linear.scale, torch.tensor([1.0, 2.0]) / 127)
    assert linear.weight.tolist() == [[64, -127, 32], [127, 0, -127]]  # 63.5 to 64: ties to even


@unit
@needs_kernel
def test_a_row_gives_the_same_bits_alone_and_in_a_batch():
    kernel = kernel_for()
    torch.manual_seed(1)  # rows of x from 1e-3 to 1e3: each its own int16 scale
    weight, x = torch.randn(21, 67), torch.randn(9, 67) * torch.logspace(-3, 3, 9)[:, None]
    int8 = Int8Linear(weight, kernel)
    for run in (lambda rows: kernel.matvec(rows, weight), int8):
        batch = run(x)
        for i in range(9):
            assert torch.equal(run(x[i : i + 1]), batch[i : i + 1]), i


@unit
@needs_kernel
def test_bad_input_is_refused_by_name():
    kernel = kernel_for()
    weight = torch.randn(8, 16)
    int8, scale = torch.ones(8, 16, dtype=torch.int8), torch.ones(8)
    cases = [
        ((torch.randn(1, 15), weight), "16 values"),
        ((torch.randn(2, 16).T.contiguous().T, weight), "contiguous fp32 rows"),
        ((torch.randn(1, 16).double(), weight), "fp32 rows"),
        ((torch.randn(1, 16), torch.randn(16, 8).T), "contiguous fp32 or int8 (out, in)"),
        ((torch.randn(1, 16), weight.half()), "fp32 or int8"),
        ((torch.randn(1, 16), weight, torch.randn(1, 7)), "residual"),
        ((torch.randn(1, 16), int8), "int8 weight needs its scale"),
        ((torch.randn(1, 16), weight, None, scale), "fp32 none"),
        ((torch.randn(1, 16), int8, None, torch.ones(7)), "vector of 8 values"),
        ((torch.randn(1, 16), int8, None, scale.double()), "fp32 vector"),
    ]
    for args, says in cases:
        with pytest.raises(RuntimeError, match=says.replace("(", r"\(").replace(")", r"\)")):
            kernel.matvec(*args)


@unit
@needs_kernel
@pytest.mark.skipif(not packing_available(), reason="oneDNN packing")
def test_few_rows_go_through_the_kernel_and_more_rows_through_onednn():
    kernel = kernel_for()
    weight = torch.randn(40, 24)
    linear, packed = FewRowsLinear(weight, kernel), PackedLinear(weight, None, 16)
    assert (linear.out_features, linear.in_features) == (40, 24)
    few, many = torch.randn(KERNEL_ROWS, 24), torch.randn(KERNEL_ROWS + 1, 24)
    residual = torch.randn(KERNEL_ROWS + 1, 40)
    torch.testing.assert_close(linear(few), kernel.matvec(few, weight), rtol=0, atol=0)
    torch.testing.assert_close(linear(many), packed(many), rtol=0, atol=0)
    torch.testing.assert_close(linear.add_to(residual, many), packed.add_to(residual, many))
    torch.testing.assert_close(
        linear.add_to(residual[:1], few[:1]), kernel.matvec(few[:1], weight, residual[:1])
    )


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
    assert isinstance(fused.layers[0].qkv, FewRowsLinear) and isinstance(
        fused.lm_head, FewRowsLinear
    )
    assert isinstance(FusedLlama.of(model, "int8").layers[0].qkv, Int8Linear)
    monkeypatch.setenv("LMREF_MATVEC", "0")  # the switch: oneDNN for every row count
    assert isinstance(FusedLlama.of(model).layers[0].qkv, PackedLinear)
    assert isinstance(FusedLlama.of(model, "int8").layers[0].qkv, SmallLinear)
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
    check_int8_shapes(kernel_for("avx2"))
    check_attention(kernel_for("avx2"))


@unit
@needs_kernel
def test_the_kernels_rotary_cache_writes_and_attention_equal_torchs_calls():
    # Rows of different lengths (each attends to its own columns only), 3 and 11 rows: the
    # kernel's rotary, cache writes and attention against torch's calls.
    config = LlamaConfig(vocab_size=150, hidden_size=48, intermediate_size=76,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for rows in (3, KERNEL_ROWS + 3):
        prompts = [[5 + i, 9, 14, 3, 7][: 1 + i % 5] for i in range(rows)]
        logits = {}
        for name in ("kernel", "torch"):
            fused = FusedLlama.of(model)
            assert fused.kernel is not None
            if name == "torch":
                fused.kernel = None
            batch, prefill = SlotBatch(model, fused), Prefill(model, prompts, pad_id=0)
            tokens = prefill.step().argmax(-1).tolist()
            batch.join(prefill)
            logits[name] = [batch.step(tokens)]
            for _ in range(4):
                logits[name].append(batch.step(logits[name][-1].argmax(-1).tolist()))
        for got, want in zip(logits["kernel"], logits["torch"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def check_attention(kernel) -> None:
    # 72 values a head (whole vectors and 8 past them), a cache of 150 columns, rows attending
    # to 1 to 150 of them (whole vectors of columns, and a few past them): the kernel's blocks
    # and its remainders. Columns past a row's position hold 1e3: reading one would show.
    torch.manual_seed(0)
    rows, heads, kv, d, columns = 9, 6, 2, 72, 150
    positions = torch.tensor([0, 14, 15, 16, 63, 64, 65, 100, 149])
    keys, values = torch.randn(2, rows, kv, d, columns), torch.randn(2, rows, kv, columns, d)
    for r, p in enumerate(positions.tolist()):
        keys[1, r, :, :, p + 1 :] = 1e3
        values[1, r, :, p + 1 :] = 1e3
    q = torch.randn(rows, heads, d)
    got = kernel.attend(q, keys, values, 1, positions, 0.125)
    for r, p in enumerate(positions.tolist()):
        k = keys[1, r, :, :, : p + 1].double().repeat_interleave(heads // kv, 0)  # (heads, d, p+1)
        v = values[1, r, :, : p + 1].double().repeat_interleave(heads // kv, 0)
        weights = torch.softmax((q[r].double()[:, None] @ k)[:, 0] * 0.125, -1)
        want = (weights[:, None] @ v)[:, 0].reshape(-1)
        torch.testing.assert_close(got[r].double(), want, rtol=1e-5, atol=1e-5)


@unit
@needs_kernel
def test_attention_is_each_rows_softmax_over_its_own_columns():
    check_attention(kernel_for())


@unit
@needs_kernel
def test_rotary_and_attention_refuse_what_does_not_fit_the_cache():
    kernel = kernel_for()
    keys, values = torch.zeros(2, 4, 1, 8, 16), torch.zeros(2, 4, 1, 16, 8)
    qkv, cos, sin = torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(2, 8)
    at = torch.tensor([3, 5])
    assert kernel.rope_store(qkv, cos, sin, keys, values, 1, at).shape == (2, 2, 8)
    assert keys[1, 1, 0, :, 5].abs().sum() > 0 and values[1, 0, 0, 3].equal(qkv[0, 3])
    with pytest.raises(RuntimeError, match="position 16 outside"):
        kernel.rope_store(qkv, cos, sin, keys, values, 0, torch.tensor([0, 16]))
    assert not keys[0].any() and not values[0].any()  # refused before row 0 was written
    with pytest.raises(RuntimeError, match="at layer 2"):
        kernel.rope_store(qkv, cos, sin, keys, values, 2, at)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        kernel.rope_store(qkv.double(), cos, sin, keys, values, 0, at)
    q = torch.randn(2, 2, 8)
    assert kernel.attend(q, keys, values, 1, at, 0.5).shape == (2, 16)
    with pytest.raises(RuntimeError, match="position -1 outside"):
        kernel.attend(q, keys, values, 0, torch.tensor([0, -1]), 0.5)
    with pytest.raises(RuntimeError, match="int64"):
        kernel.attend(q, keys, values, 0, at.int(), 0.5)
