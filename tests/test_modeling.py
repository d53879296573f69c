"""Model presets, loading in HF format, and the parameter report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmref.models.loading import load_model
from lmref.models.presets import PRESETS, build_model, model_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_small_presets_build_and_run(preset):
    model = build_model(preset, vocab_size=300)
    logits = model(torch.randint(0, 300, (2, 16))).logits
    assert logits.shape == (2, 16, 300)
    report = model_report(model)
    assert 1e6 < report["parameters"] < 10e6 and report["trainable_share"] == 1.0


@pytest.mark.unit
def test_large_presets_have_their_published_shapes():
    # Built on the meta device: no memory, only the shapes.
    with torch.device("meta"):
        gpt2 = build_model("gpt2-124m")
        llama = build_model("llama-1b")
    assert round(model_report(gpt2)["parameters"] / 1e6) == 124
    assert round(model_report(llama)["parameters"] / 1e8) == 11  # TinyLlama: 1.1B
    assert PRESETS["llama-1b"].num_key_value_heads == 4


@pytest.mark.unit
def test_overrides_and_unknown_preset():
    assert build_model("tiny", vocab_size=100, num_hidden_layers=1).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")


@pytest.mark.unit
def test_load_model_roundtrip(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu")
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "sdpa"
    report = model_report(model)
    assert report["weight_mb"] == pytest.approx(
        sum(p.numel() * 4 for p in model.parameters()) / 2**20, rel=0.01
    )


@pytest.mark.unit
def test_build_model_keeps_the_callers_rng_and_its_old_weights():
    """Same weights for a seed as the old ``torch.manual_seed(seed)`` + construction gave, and
    the caller's global RNG state untouched (the old code reseeded it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS["tiny"]
    torch.manual_seed(3)  # the old way, by hand
    reference = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=p.num_attention_heads,
            num_key_value_heads=p.num_key_value_heads,
            max_position_embeddings=p.max_position_embeddings,
            tie_word_embeddings=p.tie_word_embeddings,
        )
    ).state_dict()

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    model = build_model("tiny", vocab_size=300, seed=3, num_hidden_layers=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(model.state_dict()) == set(reference)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    other = build_model("tiny", vocab_size=300, seed=4, num_hidden_layers=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


def _package(root, pyproject: str | None = None):
    package = root / "lmref"
    package.mkdir(parents=True)
    if pyproject is not None:
        (root / "pyproject.toml").write_text(pyproject)
    return package


@pytest.mark.unit
def test_artifacts_resolve_in_order_env_checkout_cache(tmp_path, monkeypatch):
    from lmref.models.artifacts import artifacts_dir, checkout_root

    checkout = _package(tmp_path / "src", '[project]\nname = "lmref"\nversion = "0.1.0"\n')
    installed = _package(tmp_path / "venv" / "site-packages")
    other = _package(tmp_path / "other", '[project]\nname = "someone-else"\n')
    cache = tmp_path / "cache"
    assert checkout_root(checkout) == tmp_path / "src"
    assert checkout_root(installed) is None and checkout_root(other) is None

    assert artifacts_dir({"LMREF_ARTIFACTS": "/x/y"}, checkout) == Path("/x/y")
    assert artifacts_dir({}, checkout) == tmp_path / "src" / "artifacts"
    env = {"XDG_CACHE_HOME": str(cache)}
    assert artifacts_dir(env, installed) == cache / "lmref" / "artifacts"
    assert artifacts_dir(env, other) == cache / "lmref" / "artifacts"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert artifacts_dir({}, installed) == tmp_path / "home" / ".cache" / "lmref" / "artifacts"
    # this repository is a checkout: its artifacts stay where they always were
    assert artifacts_dir({}) == ROOT / "artifacts"


@pytest.mark.integration  # a child interpreter
def test_an_installed_package_writes_no_artifacts_into_site_packages(tmp_path):
    """The package copied into a fake site-packages (what ``pip install .`` does), imported in a
    fresh interpreter: ARTIFACTS is the per-user cache, not a folder beside site-packages."""
    site = tmp_path / "lib" / "site-packages"
    shutil.copytree(ROOT / "lmref", site / "lmref", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "LMREF_ARTIFACTS"}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"))
    code = "import lmref.models.artifacts as a, lmref; print(a.ARTIFACTS); print(lmref.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    artifacts, imported = out.stdout.split()
    assert Path(imported).parent == site / "lmref"  # the copy, not this checkout
    assert Path(artifacts) == tmp_path / "cache" / "lmref" / "artifacts"
