"""Model presets, loading in HF format, and the parameter report."""

from __future__ import annotations

import pytest
import torch

from lmref.models.loading import PRESETS, build_model, load_model, model_report


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_small_presets_build_and_run(preset):
    model = build_model(preset, vocab_size=300)
    logits = model(torch.randint(0, 300, (2, 16))).logits
    assert logits.shape == (2, 16, 300)
    report = model_report(model)
    assert 1e6 < report["parameters"] < 10e6 and report["trainable_share"] == 1.0


def test_large_presets_have_their_published_shapes():
    # Built on the meta device: no memory, only the shapes.
    with torch.device("meta"):
        gpt2 = build_model("gpt2-124m")
        llama = build_model("llama-1b")
    assert round(model_report(gpt2)["parameters"] / 1e6) == 124
    assert round(model_report(llama)["parameters"] / 1e8) == 11  # TinyLlama: 1.1B
    assert PRESETS["llama-1b"].num_key_value_heads == 4


def test_overrides_and_unknown_preset():
    assert build_model("tiny", vocab_size=100, num_hidden_layers=1).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")


def test_load_model_roundtrip(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu")
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "sdpa"
    report = model_report(model)
    assert report["weight_mb"] == pytest.approx(
        sum(p.numel() * 4 for p in model.parameters()) / 2**20, rel=0.01
    )
