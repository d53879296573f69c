"""LoRA / QLoRA: target discovery, frozen base, adapter round trip, merging, 4-bit training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from lmref.core.memory import PeakMemory
from lmref.models.presets import build_model
from lmref.training.loop import TrainingConfig, train
from lmref.training.lora import (
    LoraSettings,
    add_lora,
    directory_size_mb,
    find_target_modules,
    is_4bit,
    load_adapter,
    load_qlora,
    lora_config,
    merge,
    merge_and_save,
    save_adapter,
    trainable_report,
)

ROOT = Path(__file__).resolve().parent.parent

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def llama(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def gpt2() -> torch.nn.Module:
    return build_model("tiny-gpt2", vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_inner=128)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture()
def ids():
    return torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.unit
def test_targets_of_a_llama_shaped_model(tiny_model_dir):
    model = llama(tiny_model_dir)
    assert find_target_modules(model) == LLAMA_LINEAR
    assert find_target_modules(model, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert find_target_modules(model, "mlp") == ["down_proj", "gate_proj", "up_proj"]
    assert "lm_head" not in find_target_modules(model)  # the output head is never adapted
    assert lora_config(model).fan_in_fan_out is False


@pytest.mark.unit
def test_targets_of_a_gpt2_shaped_model(ids):
    model = gpt2()
    assert find_target_modules(model) == ["c_attn", "c_fc", "c_proj"]
    # c_proj exists in attention and MLP: the name is qualified where the choice leaves one out.
    assert find_target_modules(model, "attention") == ["attn.c_proj", "c_attn"]
    assert find_target_modules(model, "mlp") == ["c_fc", "mlp.c_proj"]
    assert lora_config(model).fan_in_fan_out is True  # Conv1D stores W transposed
    before = logits(model, ids)
    peft_model = add_lora(model, LoraSettings(target_modules="attention"))
    adapted = {
        n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n
    }
    assert len(adapted) == 4 and not any("mlp" in n for n in adapted), adapted
    # B starts at zero: the adapted model is the base model until it trains.
    assert torch.equal(logits(peft_model, ids), before)


@pytest.mark.unit
def test_bad_settings_get_clear_errors(tiny_model_dir):
    model = llama(tiny_model_dir)
    with pytest.raises(ValueError, match="which must be"):
        find_target_modules(model, "everything")
    with pytest.raises(ValueError, match="rank"):
        lora_config(model, LoraSettings(r=0))
    with pytest.raises(ValueError, match="names a linear layer"):
        lora_config(model, LoraSettings(target_modules=["not_a_layer"]))
    with pytest.raises(TypeError, match="peft model"):
        save_adapter(model, "unused")


@pytest.mark.unit
def test_only_lora_parameters_train(tiny_model_dir):
    model = add_lora(llama(tiny_model_dir), LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r * (in + out) per adapted layer: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads.
    shapes = {
        "q_proj": (64, 64),
        "k_proj": (64, 32),
        "v_proj": (64, 32),
        "o_proj": (64, 64),
        "gate_proj": (64, 128),
        "up_proj": (64, 128),
        "down_proj": (128, 64),
    }
    expected = 2 * sum(4 * (i + o) for i, o in shapes.values())  # 2 layers
    report = trainable_report(model)
    assert report["trainable_parameters"] == report["lora_parameters"] == expected
    assert 0 < report["trainable_share"] < 0.2 and report["base_in_4bit"] is False


@pytest.mark.unit
def test_a_trained_tied_embedding_is_counted_once(tiny_model_dir):
    base = llama(tiny_model_dir)
    assert base.config.tie_word_embeddings
    base_count = sum(p.numel() for p in base.parameters())
    vocab = base.get_input_embeddings().weight.numel()
    model = add_lora(base, LoraSettings(r=4, alpha=8, modules_to_save=["embed_tokens"]))
    report = trainable_report(model)
    # One trainable copy of the tied matrix (the head uses the same tensor), next to the frozen one.
    assert report["copied_parameters"] == vocab
    assert report["trainable_parameters"] == report["lora_parameters"] + vocab
    assert report["base_parameters"] == base_count  # what full fine-tuning would train
    # peft divides by everything held, the vocabulary twice (original and copy): a smaller share.
    assert model.get_nb_trainable_parameters() == (
        report["trainable_parameters"],
        report["parameters"],
    )
    assert report["parameters"] == base_count + report["lora_parameters"] + vocab
    assert report["trainable_share"] == report["trainable_parameters"] / base_count
    # Two Parameter objects on one storage (a tie made by hand) are still one tensor.
    tied = llama(tiny_model_dir)
    tied.lm_head.weight = torch.nn.Parameter(tied.get_input_embeddings().weight.data)
    assert trainable_report(tied)["parameters"] == base_count


@pytest.mark.unit
def test_adapter_save_then_load_gives_identical_logits(tiny_model_dir, tmp_path, ids):
    model = add_lora(llama(tiny_model_dir), LoraSettings(init_lora_weights=False))  # B != 0
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(llama(tiny_model_dir), ids))  # the adapter matters
    save_adapter(model, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files  # the base is referenced, not copied
    assert directory_size_mb(tmp_path / "adapter") < directory_size_mb(tiny_model_dir)
    for base in (llama(tiny_model_dir), tiny_model_dir):  # a model object or a path
        loaded = load_adapter(base, tmp_path / "adapter", device="cpu")
        assert torch.equal(logits(loaded, ids), expected)
        assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    with pytest.raises(FileNotFoundError, match="adapter_config"):
        load_adapter(tiny_model_dir, tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize("shape", ["llama", "gpt2", "llama+embeddings"])
def test_merged_model_matches_the_adapter_model(shape, tiny_model_dir, tmp_path, ids):
    base = gpt2() if shape == "gpt2" else llama(tiny_model_dir)
    base_logits = logits(base, ids)
    extra = ["embed_tokens"] if shape == "llama+embeddings" else []
    model = add_lora(base, LoraSettings(init_lora_weights=False, alpha=32, modules_to_save=extra))
    if extra:  # a trained copy of the tied embedding: the output head must follow it
        with torch.no_grad():
            copy = model.base_model.model.model.embed_tokens.modules_to_save["default"].weight
            copy.add_(0.05 * torch.randn_like(copy))
    adapter_logits = logits(model, ids)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # a real update to fold in
    merged = merge_and_save(model, tmp_path / "merged")
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    assert (logits(merged, ids) - adapter_logits).abs().max() < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (logits(reloaded, ids) - adapter_logits).abs().max() < 1e-4
    with pytest.raises(TypeError):
        merge(reloaded)


@pytest.mark.unit
def test_qlora_trains_on_cpu_with_a_4bit_base(tiny_model_dir, tiny_tokenizer, tmp_path):
    import bitsandbytes as bnb

    model = load_qlora(tiny_model_dir, LoraSettings(r=8, alpha=16, dropout=0.0), device="cpu")
    assert is_4bit(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(q_proj.base_layer.weight, bnb.nn.Params4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert q_proj.base_layer.weight.dtype == torch.uint8  # two 4-bit values per byte
    report = trainable_report(model)
    assert report["base_in_4bit"] and report["trainable_parameters"] == report["lora_parameters"]

    text = "The quick brown fox jumps over the lazy dog. " * 6
    block = tiny_tokenizer(text)["input_ids"][:32]
    data = Dataset.from_dict({"input_ids": [block] * 8})
    config = TrainingConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        learning_rate=2e-2,
        per_device_train_batch_size=4,
        logging_steps=1,
        weight_decay=0.0,
        disable_tqdm=True,
    )
    packed_before = q_proj.base_layer.weight.data.clone()
    result = train(model, data, config)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    # The adapter learned; the 4-bit base did not move.
    assert is_4bit(model) and torch.equal(q_proj.base_layer.weight.data, packed_before)
    with pytest.raises(ValueError, match="full precision"):
        merge(model)


@pytest.mark.unit
def test_peak_memory_collects_earlier_garbage_at_entry():
    """Garbage left by earlier work (here a 64 MiB tensor in a reference cycle) is freed before
    the block starts, not inside it, where it would cancel the block's own allocations."""
    cycle = type("Garbage", (), {})()
    cycle.tensor, cycle.itself = torch.ones(16 * 2**20), cycle
    alive = weakref.ref(cycle)
    del cycle
    assert alive() is not None  # only the cycle collector can free it
    with PeakMemory(device="cpu"):
        assert alive() is None


# Each measurement runs in a fresh interpreter: in the test process, threads and allocator
# state left by earlier tests free memory while the block allocates (a 64 MiB tensor measured
# 0.0 MB in the full suite, while passing alone).
PEAK_SCRIPT = textwrap.dedent("""
    import json, mmap, sys, torch
    from lmref.core.memory import PeakMemory

    mapped = None
    if len(sys.argv) > 1:  # a file made resident first, unmapped inside the block
        with open(sys.argv[1], "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == len(mapped) // 4096
    with PeakMemory(device="cpu") as mem:
        if mapped is not None:
            mapped.close()                       # RSS falls by 128 MiB...
        block = torch.ones(16 * 2**20 // 4 * 4)  # ...and rises by 64 MiB, touched
        block += 1
    print(json.dumps(mem.added_mb))
""")


def _added_mb(*args: str) -> float:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
    added = json.loads(out.splitlines()[-1])
    if added is None:
        pytest.skip("no /proc/self/status on this platform")
    return added


@pytest.mark.integration
def test_peak_memory_sees_an_allocation():
    assert _added_mb() > 48


@pytest.mark.integration
def test_peak_memory_sees_an_allocation_while_file_pages_leave(tmp_path):
    """File-backed pages leaving RSS inside the block (here an unmapped file; on a VM, the kernel
    reclaiming cold library pages) must not hide the block's own 64 MiB."""
    path = tmp_path / "cold.bin"
    path.write_bytes(b"\1" * (128 * 2**20))
    assert _added_mb(str(path)) > 48
