"""``lmref.serving.packed_linear.pack_linears``: every linear layer (Llama's ``nn.Linear``, GPT-2's
``Conv1D``) replaced by a oneDNN-packed one whose outputs equal the original's to rounding, the
engine serving the same greedy text packed and unpacked, and misuse refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lmref.serving.packed_linear import PackedLinear, pack_linears, packing_available

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN"),
]


def _linears(model) -> int:
    return sum(type(m) in (torch.nn.Linear, Conv1D) for m in model.modules())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_packed_llama_computes_the_same_logits(tiny_model_dir, dtype, tolerance):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        expected = model(ids).logits.float()
        linears = _linears(model)
        if not packing_available(dtype):  # bf16 on a CPU without AVX-512: left as it was
            assert pack_linears(model) == 0 and _linears(model) == linears
            assert torch.equal(model(ids).logits.float(), expected)
            return
        assert pack_linears(model) == linears == 2 * 7 + 1  # q k v o gate up down per layer, head
        assert _linears(model) == 0 and isinstance(model.lm_head, PackedLinear)
        got = model(ids).logits.float()
    assert (got - expected).abs().max() < tolerance * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("rows, hint", [(1, 1), (1, 16), (16, 16), (64, 1)])
def test_add_to_is_the_residual_plus_the_linear_bit_for_bit(rows, hint):
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    layer = PackedLinear(weight, bias, hint)
    x, residual = torch.randn(rows, 40, generator=g), torch.randn(rows, 24, generator=g)
    kept = residual.clone()
    got = layer.add_to(residual, x)
    assert torch.equal(got, residual + layer(x))  # the "sum" post-op: the same rounding
    assert torch.equal(residual, kept)  # a new tensor: the residual stream is not overwritten
    torch.testing.assert_close(got, residual + x @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_packed_gpt2_conv1d_is_transposed_right():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    ).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.inference_mode():
        expected = model(ids).logits
        assert pack_linears(model) == 2 * 4 + 1  # c_attn c_proj c_fc mlp.c_proj per layer, head
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_training_and_adapter_models_are_refused(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="eval"):
        pack_linears(model.train())
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).eval()
    with pytest.raises(ValueError, match="merge_and_unload"):
        pack_linears(peft_model)


def test_engine_greedy_text_is_the_same_packed_and_unpacked(tiny_model_dir):
    from lmref.serving.engine import (
        Engine,
        EngineMetrics,
        Job,
        ModelSpec,
        ResponseCache,
        SamplingParams,
    )

    texts = {}
    for packed in (True, False):
        engine = Engine(
            ModelSpec("t", str(tiny_model_dir), batch_wait_ms=0, pack_linears=packed),
            EngineMetrics(),
            ResponseCache(0),
        )
        engine.start()
        assert engine.loaded.wait(120) and engine.ready, engine.load_error
        assert any(isinstance(m, PackedLinear) for m in engine.model.modules()) == packed
        job = Job("t", stream=False)
        for prompt in ("def add(a, b):", "import os", "x"):
            job.add_row(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        engine.submit(job)
        texts[packed] = [r.text for r in engine.results(job)]
        engine.close()
    assert texts[True] == texts[False] and all(texts[True])


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16"])
def test_engine_serves_bf16_packed_by_either_name(tiny_model_dir, dtype):
    from lmref.serving.engine import (
        Engine,
        EngineMetrics,
        Job,
        ModelSpec,
        ResponseCache,
        SamplingParams,
    )

    engine = Engine(
        ModelSpec("t", str(tiny_model_dir), batch_wait_ms=0, dtype=dtype),
        EngineMetrics(),
        ResponseCache(0),
    )
    engine.start()
    assert engine.loaded.wait(120) and engine.ready, engine.load_error
    if packing_available(torch.bfloat16):
        assert engine.model.lm_head.packed.dtype == torch.bfloat16
    else:  # this CPU has no oneDNN bf16 kernels: served unpacked, in bf16
        assert type(engine.model.lm_head) is torch.nn.Linear
        assert engine.model.lm_head.weight.dtype == torch.bfloat16
    job = Job("t", stream=False)
    job.add_row("def add(a, b):", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.submit(job)
    assert engine.results(job)[0].completion_tokens == 8
    engine.close()


def test_engine_serves_an_adapter_folder_unpacked(tiny_model_dir, tmp_path):
    """transformers loads an adapter folder with its base; its LoRA layers wrap plain Linears, so
    the engine leaves that model unpacked instead of failing to load it."""
    from peft import LoraConfig, get_peft_model

    from lmref.core.manifest import write_manifest
    from lmref.serving.engine import (
        Engine,
        EngineMetrics,
        Job,
        ModelSpec,
        ResponseCache,
        SamplingParams,
    )

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # The adapter's config records the base folder it was made from.
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    write_manifest(tmp_path)  # the server serves an adapter (and its base) only verified
    engine = Engine(
        ModelSpec("a", str(tmp_path), batch_wait_ms=0), EngineMetrics(), ResponseCache(0)
    )
    engine.start()
    assert engine.loaded.wait(120) and engine.ready, engine.load_error
    assert engine.model.peft_config and not any(
        isinstance(m, PackedLinear) for m in engine.model.modules()
    )
    job = Job("a", stream=False)
    job.add_row("def add(", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.submit(job)
    assert engine.results(job)[0].completion_tokens == 4
    engine.close()
