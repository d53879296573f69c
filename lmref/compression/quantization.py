"""Quantization: int8 dynamic (CPU), bitsandbytes LLM.int8 and 4-bit, and saving each variant.

``quantize_int8_dynamic`` gives int8 weights with activations quantized on the fly, for CPU
inference (see its docstring for why it is ``torch.ao`` and not torchao). ``load_bnb`` loads
bitsandbytes LLM.int8 or 4-bit nf4/fp4 through the one loader, ``lmref.models.loading``, in the
compute dtype of ``lmref.core.device`` (the project's one device/dtype policy). ``save_model``
saves every variant that can be saved, and ``SAVE_SUPPORT`` says why the others cannot.

Usage::

    from lmref.compression.quantization import load_bnb, quantize_int8_dynamic, save_model

    q = quantize_int8_dynamic(model)                                # CPU int8, not saveable
    nf4 = load_bnb("artifacts/base", "nf4")                         # bitsandbytes 4-bit
    save_model(nf4, "artifacts/base-nf4")                           # reloads quantized
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lmref.compression.pruning import DEFAULT_SKIP, prunable_linears, pruning_leftovers
from lmref.core.manifest import write_manifest
from lmref.models.loading import load_model

# Which format each variant saves in, and why not where it cannot.
SAVE_SUPPORT = {
    "pruned": "save_pretrained: a plain safetensors model (zeros stored densely: pruning alone "
    "does not shrink the file; sparse storage or 2:4 kernels are what turn zeros into "
    "bytes or speed)",
    "bnb-int8": "save_pretrained: int8 weights + SCB scales in safetensors; reload with "
    "from_pretrained (the quantization config is stored in config.json)",
    "bnb-4bit": "save_pretrained: packed 4-bit weights + absmax/quant_map in safetensors; reload "
    "with from_pretrained",
    "int8-dynamic": "not saveable as safetensors: torch.ao packs int8 weights into TorchScript "
    "objects (only a pickle holds them, and we never load pickles); save the "
    "float model and re-quantize after loading, which takes seconds",
}


def quantize_int8_dynamic(
    model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, inplace: bool = False
) -> nn.Module:
    """int8 weights (per output channel), activations quantized per batch at run time, CPU only.

    Why ``torch.ao.quantization.quantize_dynamic`` and not torchao: torch 2.13 marks ``torch.ao``
    deprecated ("will be removed in 2.10", yet still shipped in 2.13) in favour of torchao's
    ``quantize_``. We tried torchao 0.18 (``Int8DynamicActivationInt8WeightConfig``, eager, CPU):
    on a 100M-parameter model it sped prefill up 2.7x but decode only 1.0-1.1x fp32, while
    torch.ao's fbgemm/oneDNN kernels decoded 1.7-1.8x faster (two runs of
    ``benchmarks/compression.py``, which records both), and decode is what CPU inference waits
    on; torchao is also not installed with this project. So this uses the deprecated API on
    purpose and silences its warning; the day torch drops it, replace the body with torchao's
    ``quantize_(model, Int8DynamicActivationInt8WeightConfig())``.
    """
    skip = tuple(skip)
    target = model if inplace else copy.deepcopy(model)
    _conv1d_to_linear(target, prunable_linears(target, skip))
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    spec = {name: qconfig for name in prunable_linears(target, skip)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return torch.ao.quantization.quantize_dynamic(
            target.eval(), spec, dtype=torch.qint8, inplace=True
        )


def _conv1d_to_linear(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Replace GPT-2's ``Conv1D`` layers with the equivalent ``nn.Linear`` (weight transposed):
    ``quantize_dynamic`` only knows ``nn.Linear``."""
    for name, mod in modules.items():
        if isinstance(mod, Conv1D):
            linear = nn.Linear(
                mod.weight.shape[0],
                mod.weight.shape[1],
                device=mod.weight.device,
                dtype=mod.weight.dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(mod.weight.T)
                linear.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, linear)


def load_bnb(
    name_or_path: str | Path,
    mode: str,
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = False,
) -> PreTrainedModel:
    """Load a causal LM with bitsandbytes weights ("int8", "nf4", "fp4") on ``device``.

    Quantization happens while loading, from any HF folder or hub id, through the one loader
    (``lmref.models.loading.load_model``, which runs the bitsandbytes setup step);
    ``compute_dtype=None`` is the device policy's dtype. bitsandbytes >= 0.49 runs these on CPU
    too (slowly: its CPU kernels dequantize per matmul); on a GPU they save memory. A folder
    saved from such a model (``save_model``) reloads already quantized.
    """
    return load_model(
        name_or_path,
        dtype=compute_dtype or "auto",
        device=device or "auto",
        quantization=mode,
        double_quant=double_quant,
    )


def is_dynamic_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def save_model(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """``save_pretrained`` (safetensors) for plain, pruned and bitsandbytes models.

    int8-dynamic models raise: see ``SAVE_SUPPORT["int8-dynamic"]``.
    """
    if is_dynamic_quantized(model):
        raise TypeError(SAVE_SUPPORT["int8-dynamic"])
    if pruning_leftovers(model):
        raise ValueError(
            f"masks or hooks left on {pruning_leftovers(model)[:3]}: "
            "call make_permanent(model) first"
        )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    write_manifest(out_dir)  # last: the server refuses a folder that differs from it
    return out_dir
