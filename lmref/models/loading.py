"""The one model loader: any causal LM by course name, hub id or local folder, in the device and
dtype policy of ``lmref.core.device``, optionally quantized by bitsandbytes while loading.

Every stage that loads a model calls ``load_model`` (training, LoRA/QLoRA, compression, the
serving engine), so the device, dtype, quantization and safety choices are made here once:

- **names**: a course name (``lmref.models.real_model.NAMED_MODELS``) becomes its converted
  folder (``resolve_model``, converting on first use); a registry URI (``models:/NAME@ALIAS``)
  its downloaded, verified version (``lmref.models.registry``); a hub id or folder passes through;
- **dtype**: "auto" (the policy: bf16/fp16 on GPUs, fp32 on CPU), a precision name ("fp32",
  "bf16", "fp16"), a torch dtype name ("bfloat16") or a ``torch.dtype``;
- **quantization**: None, "int8" (LLM.int8), "nf4" or "fp4" (4-bit), through transformers'
  ``BitsAndBytesConfig``; the bitsandbytes setup step (``lmref.models.quantized``) runs here;
- **safety**: weights are read from safetensors only (a pickled ``pytorch_model.bin`` can run
  code on load); the model is returned in eval mode unless asked otherwise.

Usage::

    from lmref.models.loading import load_model, load_tokenizer

    model = load_model("artifacts/base")                       # or "HuggingFaceTB/SmolLM2-135M"
    chat = load_model("smollm2-135m-instruct", dtype="bf16")   # the packaged real model, offline
    nf4 = load_model("artifacts/base", quantization="nf4", double_quant=True)   # QLoRA's base
    tokenizer = load_tokenizer("smollm2-135m-instruct")        # with its chat template
    folder = resolve_model("models:/lmref-chat@champion")      # the registry's champion, verified
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmref.core.device import PRECISIONS, compute_dtype, resolve_device
from lmref.models import artifacts
from lmref.models.quantized import prepare_bitsandbytes, quantization_config
from lmref.models.real_model import NAMED_MODELS, convert_gguf, packaged_gguf_path


def resolve_model(name_or_path: str | Path) -> str:
    """A course name (``NAMED_MODELS``) becomes its converted folder, converted on first use;
    a registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) its downloaded, verified
    folder (``lmref.models.registry.fetch_model``; an alias is looked up on each call, so resolve
    once and pass the folder on); a local folder or hub id passes through unchanged."""
    if str(name_or_path).startswith("models:/"):
        from lmref.models.registry import fetch_model  # mlflow: an optional dependency

        return str(fetch_model(str(name_or_path)))
    source = NAMED_MODELS.get(str(name_or_path))
    if source is None:
        return str(name_or_path)
    out_dir = artifacts.ARTIFACTS / str(name_or_path)
    if not (out_dir / "model.safetensors").exists():
        convert_gguf(packaged_gguf_path(source), out_dir, source.sha256)
    return str(out_dir)


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str) -> torch.dtype:
    """``"auto"`` or a precision name through the device policy; a dtype or its name as asked."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto" or dtype in PRECISIONS:
        return compute_dtype(device, dtype)
    found = getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"dtype must be auto, fp32, bf16, fp16 or a torch dtype, not {dtype!r}")
    return found


def saved_quantization(path: str, **kwargs) -> str | None:
    """The bitsandbytes mode ("int8", "nf4", "fp4") a folder was saved in, None when it holds
    plain weights (read from its config.json; ``kwargs`` as for ``from_pretrained``).

    A PEFT adapter folder has no config.json (transformers loads its base through
    adapter_config.json): its base's mode is the base's business, so this says None.
    """
    if Path(path).is_dir() and not (Path(path) / "config.json").exists():
        return None
    wanted = ("revision", "subfolder", "token", "trust_remote_code", "cache_dir")
    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in wanted})
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return None
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("quant_method") != "bitsandbytes":
        return None
    return "int8" if saved.get("load_in_8bit") else saved.get("bnb_4bit_quant_type", "nf4")


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
    attn_implementation: str | None = None,
    quantization: str | None = None,
    double_quant: bool = False,
    eval_mode: bool = True,
    **kwargs,
) -> PreTrainedModel:
    """Load any causal LM by course name, hub id or local folder, on this machine's device/dtype.

    ``dtype`` is also the compute dtype of a quantized model. ``quantization`` ("int8", "nf4",
    "fp4") quantizes while loading, on ``device`` (bitsandbytes >= 0.49 runs on CPU too, slowly:
    its CPU kernels dequantize per matmul; on a GPU it saves memory); ``double_quant`` also
    quantizes the 4-bit scales (QLoRA's "double quantisation"). A folder saved from a quantized
    model reloads quantized with ``quantization=None``. ``attn_implementation=None`` keeps the
    model's own default (sdpa for most, eager where a model needs it, e.g. Gemma 2's
    soft-capping). ``eval_mode=False`` returns the model in train mode (dropout on).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = resolve_model(name_or_path)
    saved = saved_quantization(path, **kwargs)
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, dtype, double_quant)
    if quantization is not None or saved is not None:
        prepare_bitsandbytes(quantization or saved)
        # Quantized weights are placed while loading; a bitsandbytes model cannot be moved after.
        place = (device.index or 0) if device.type == "cuda" else "cpu"
        kwargs.setdefault("device_map", {"": place})
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        use_safetensors=True,
        **kwargs,
    )
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.train(not eval_mode)


def load_tokenizer(name_or_path: str | Path, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template, if it has one) of a course name, hub id or folder."""
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), **kwargs)
