"""The one model loader (lmref.models.loading): its callers agree, its options, and the explicit
bitsandbytes setup step (applied where quantized models are loaded, never on import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lmref.compression import load_bnb
from lmref.models.loading import load_model, resolve_dtype
from lmref.training.lora import load_4bit

ROOT = Path(__file__).resolve().parent.parent


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.unit
def test_dtype_options_of_the_loader(tiny_model_dir):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float33", "cpu")
    # what an inference server asks for: a precision by name, a device, eval mode
    model = load_model(tiny_model_dir, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16 and not model.training
    assert load_model(tiny_model_dir, device="cpu", eval_mode=False).training


@pytest.mark.unit
def test_lora_compression_and_the_loader_load_the_same_quantized_model(tiny_model_dir):
    """QLoRA's base (lora.load_4bit), compression's nf4 and int8 loads and load_model give the same
    weights and logits, and those of transformers' own BitsAndBytesConfig load with the recipe
    each documents (QLoRA: nf4 + double quantisation; compute dtype of the device policy)."""
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    reference_kwargs = dict(dtype=torch.float32, device_map={"": "cpu"}, use_safetensors=True)
    cases = {
        "qlora": (
            lambda: load_4bit(tiny_model_dir, device="cpu"),
            lambda: load_bnb(tiny_model_dir, "nf4", device="cpu", double_quant=True),
            dict(quantization="nf4", double_quant=True),
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        ),
        "int8": (
            None,
            lambda: load_bnb(tiny_model_dir, "int8", device="cpu"),
            dict(quantization="int8"),
            BitsAndBytesConfig(load_in_8bit=True),
        ),
    }
    for name, (from_lora, from_compression, options, config) in cases.items():
        loaded = load_model(tiny_model_dir, device="cpu", **options)
        reference = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, quantization_config=config, **reference_kwargs
        )
        callers = [reference, from_compression()] + ([from_lora()] if from_lora else [])
        expected = _state(loaded)  # before any forward (bitsandbytes repacks 4-bit on CPU then)
        assert type(loaded.model.layers[0].mlp.up_proj).__name__ in ("Linear4bit", "Linear8bitLt")
        assert type(loaded.lm_head).__name__ == "Linear"  # the output head stays unquantized
        for caller in callers:
            state = _state(caller)
            assert state.keys() == expected.keys(), name
            for key, value in expected.items():
                assert torch.equal(state[key], value), (name, key)
        logits = _logits(loaded, ids)
        for caller in callers:
            assert torch.equal(_logits(caller, ids), logits), name


# A fresh interpreter: whether bitsandbytes is patched must not depend on earlier tests.
IMPORTS_ONLY = textwrap.dedent("""
    import json, logging
    import lmref.compression, lmref.models, lmref.models.loading, lmref.models.quantized
    import lmref.training.lora
    from bitsandbytes import functional
    print(json.dumps({
        "patched": getattr(functional._convert_weight_packed_for_cpu_inverse, "lmref_exact", False),
        "int8 logger": logging.getLogger("bitsandbytes.autograd._functions").level,
    }))
""")

ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch
    from bitsandbytes import functional
    from lmref.models.loading import load_model

    source, out = sys.argv[1], sys.argv[2]
    ids = torch.arange(1, 33).reshape(2, 16)
    model = load_model(source, device="cpu", quantization="nf4", double_quant=True)
    with torch.inference_mode():
        before = model(input_ids=ids).logits     # repacks the 4-bit weights on CPU
    model.save_pretrained(out)                   # state_dict() undoes the repacking
    reloaded = load_model(out, device="cpu")     # saved quantized: no option needed
    with torch.inference_mode():
        again = reloaded(input_ids=ids).logits
        still = model(input_ids=ids).logits
    print(json.dumps({
        "patched": getattr(functional._convert_weight_packed_for_cpu_inverse, "lmref_exact", False),
        "reloaded 4-bit": type(reloaded.model.layers[0].mlp.up_proj).__name__,
        "reload equal": torch.equal(again, before),
        "in memory equal": torch.equal(still, before),
    }))
""")


# A folder saved quantized, loaded in a fresh interpreter with no quantization option.
RELOAD = textwrap.dedent("""
    import json, sys
    from bitsandbytes import functional
    from lmref.models.loading import load_model

    model = load_model(sys.argv[1], device="cpu")
    print(json.dumps({
        "patched": getattr(functional._convert_weight_packed_for_cpu_inverse, "lmref_exact", False),
        "reloaded 4-bit": type(model.model.layers[0].mlp.up_proj).__name__,
    }))
""")


def _run(script: str, *args: str) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.integration
def test_importing_the_stages_leaves_bitsandbytes_unpatched():
    assert _run(IMPORTS_ONLY) == {"patched": False, "int8 logger": 0}


@pytest.mark.integration
def test_a_4bit_model_from_the_loader_saves_and_reloads_exactly(tiny_model_dir, tmp_path):
    assert _run(ROUND_TRIP, str(tiny_model_dir), str(tmp_path / "nf4")) == {
        "patched": True,
        "reloaded 4-bit": "Linear4bit",
        "reload equal": True,
        "in memory equal": True,
    }
    assert _run(RELOAD, str(tmp_path / "nf4")) == {"patched": True, "reloaded 4-bit": "Linear4bit"}
