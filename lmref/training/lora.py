"""LoRA and QLoRA fine-tuning with peft + bitsandbytes: attach, train, save, load, merge.

LoRA (Hu et al., 2021) freezes every weight ``W`` of the base model and learns a low-rank
update for chosen linear layers: ``W x + (alpha / r) * B A x`` with ``A`` (r x in) and ``B``
(out x r). Only ``A`` and ``B`` get gradients and optimizer state, so a 2048x2048 projection
trains 2 * 2048 * r numbers instead of 4.2M (r=16: 1.6%). ``B`` starts at zero, so step 0 is
the base model exactly. The knobs (fields of ``LoraSettings``):

- ``r`` (rank): capacity of the update. 8-64 covers most fine-tuning; a narrow task (the
  course's instruction set) is learnt with r=8, new knowledge or a new language wants more.
- ``alpha``: the update is scaled by ``alpha / r``. Hu et al. keep ``alpha`` fixed when ``r``
  changes (set once, to the first ``r`` tried, never tuned): with Adam, tuning ``alpha`` is
  roughly tuning the learning rate, and the ``1 / r`` is meant to spare re-tuning the learning
  rate across ranks. rsLoRA (Kalajdzievski, 2023) shows that ``1 / r`` shrinks the update too
  much at high ranks (learning slows, a larger rank stops helping) and scales by
  ``alpha / sqrt(r)`` instead, which keeps updates stable across ranks (``use_rslora=True``).
  ``alpha = 2 * r`` is a common starting point.
- ``dropout``: dropout on the LoRA input only; regularises small data sets. 0 is faster (and
  what ``torch.compile`` likes); 0.05-0.1 is usual.
- ``target_modules``: which layers get an update. ``"all-linear"`` (every linear layer but the
  output head; the QLoRA paper's finding: all layers beat attention-only at equal parameters),
  ``"attention"`` (q/k/v/o, the original LoRA paper), ``"mlp"``, or an explicit list of names.
  ``find_target_modules`` resolves these for any causal LM: Llama-style ``q_proj ... down_proj``
  (``nn.Linear``), GPT-2-style ``c_attn/c_proj/c_fc`` (transformers' ``Conv1D``, whose weight is
  stored transposed: peft needs ``fan_in_fan_out=True``, set here automatically).

- ``modules_to_save``: modules trained in full next to the adapters, e.g. ``["embed_tokens"]``
  when the task needs tokens the base rarely produced (or new tokens); with tied input/output
  embeddings peft keeps the head tied to the trained copy (``ensure_weight_tying``), so merging
  stays exact. LoRA on a tied embedding itself does not merge correctly, hence this route.

Every model here is loaded by the one loader, ``lmref.models.loading.load_model``: a 4-bit base
evaluated on a CPU and then saved (``save_adapter`` calls ``state_dict()``) relies on the
bitsandbytes setup step it runs (``lmref.models.quantized.prepare_bitsandbytes``).

QLoRA (Dettmers et al., 2023) keeps the frozen base in 4-bit NormalFloat (nf4, with the
quantisation constants themselves quantised: "double quantisation") and computes in a higher
precision (bf16 on GPUs, fp32 on CPU: ``lmref.core.device``'s policy); gradients flow through the dequantised weights into the
LoRA matrices, which stay in full precision. Memory for the base drops ~4x vs bf16.

Merging folds ``(alpha / r) B A`` into ``W``: the result is a plain Hugging Face model with no
peft dependency and no extra latency. Merge onto a full-precision base; merging into 4-bit
weights re-quantises and loses precision (peft warns), so for a QLoRA adapter load the base in
full precision, ``load_adapter`` it there, then merge.

Usage::

    from lmref.training.lora import LoraSettings, add_lora, load_qlora, trainable_report, \\
        save_adapter, load_adapter, merge_and_save
    from lmref.models.loading import load_model
    from lmref.training.loop import TrainingConfig, train

    model = add_lora(load_model("artifacts/base"), LoraSettings(r=8, alpha=16))
    # or QLoRA: model = load_qlora("artifacts/base", LoraSettings(r=8, alpha=16))
    print(trainable_report(model))          # {"trainable_parameters": 108544, "trainable_share": 0.046, ...}
    train(model, data["train"], TrainingConfig(learning_rate=3e-3, max_steps=100), collate_fn=collator)
    save_adapter(model, "artifacts/lora-adapter", tokenizer)          # adapter_model.safetensors
    model = load_adapter("artifacts/base", "artifacts/lora-adapter")  # base path or model
    merge_and_save(model, "artifacts/lora-merged", tokenizer)         # a plain HF model
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lmref.core.manifest import write_manifest
from lmref.models.loading import load_model

# Leaf names of the attention projections across common architectures (Llama/Mistral/Qwen:
# q/k/v/o_proj; GPT-2: c_attn + attn.c_proj; GPT-NeoX: query_key_value + dense; OPT: out_proj).
_ATTENTION_PARENTS = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)$")


@dataclass
class LoraSettings:
    """What to adapt and how strongly; see the module docstring for how to choose each value."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # "all-linear" | "attention" | "mlp" | names
    bias: str = "none"  # "none" | "lora_only" | "all"
    use_rslora: bool = False
    # True: B = 0, so the adapted model starts as the base. False: B random too (for tests that
    # must see a non-zero update before training).
    init_lora_weights: bool | str = True
    modules_to_save: list[str] = field(default_factory=list)  # extra modules trained in full
    # Embeddings tied to the output head (small models): an adapter on one is applied to both.
    ensure_weight_tying: bool = True


def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear layer (nn.Linear, GPT-2 Conv1D, bitsandbytes 4/8-bit) except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if module is head or "lora_" in name:
            continue
        # bnb's Linear4bit / Linear8bitLt subclass nn.Linear, so a 4-bit base is found as well.
        if isinstance(module, torch.nn.Linear | Conv1D):
            found[name] = module
    return found


def find_target_modules(model: torch.nn.Module, which: str = "all-linear") -> list[str]:
    """Names to pass as peft ``target_modules``: ``"all-linear"``, ``"attention"`` or ``"mlp"``.

    Names are leaf names (``q_proj``) where that is unambiguous, else ``parent.leaf``
    (GPT-2's ``attn.c_proj`` vs ``mlp.c_proj``); peft matches them as suffixes of module paths.
    """
    if which not in {"all-linear", "attention", "mlp"}:
        raise ValueError(f"which must be 'all-linear', 'attention' or 'mlp', not {which!r}")
    layers = _linear_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layers to adapt")

    def in_attention(name: str) -> bool:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        return bool(_ATTENTION_PARENTS.search(parent))

    chosen = {
        n for n in layers if which == "all-linear" or (which == "attention") == in_attention(n)
    }
    if not chosen:
        raise ValueError(f"no {which} layers found in {type(model).__name__}")
    leaf = lambda n: n.rsplit(".", 1)[-1]  # noqa: E731
    left_out = {leaf(n) for n in layers if n not in chosen}
    names = set()
    for name in chosen:
        parts = name.split(".")
        names.add(parts[-1] if parts[-1] not in left_out else ".".join(parts[-2:]))
    return sorted(names)


def lora_config(model: torch.nn.Module, settings: LoraSettings | None = None) -> LoraConfig:
    """A peft ``LoraConfig`` for ``model`` with the target modules resolved to names."""
    settings = settings or LoraSettings()
    if settings.r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got {settings.r}")
    targets = settings.target_modules
    if isinstance(targets, str):
        targets = find_target_modules(model, targets)
    elif not targets:
        raise ValueError("target_modules is empty")
    layers = _linear_layers(model)
    targeted = [m for n, m in layers.items() if any(n == t or n.endswith("." + t) for t in targets)]
    if not targeted:
        raise ValueError(f"none of {targets} names a linear layer of {type(model).__name__}")
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        bias=settings.bias,
        use_rslora=settings.use_rslora,
        init_lora_weights=settings.init_lora_weights,
        modules_to_save=list(settings.modules_to_save) or None,
        task_type="CAUSAL_LM",
        # Only where a tied module is trained (the targets are linear layers, never embeddings):
        # asked for without one, peft warns that there is nothing to tie.
        ensure_weight_tying=settings.ensure_weight_tying
        and bool(settings.modules_to_save)
        and bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)),
        # Conv1D stores W as (in, out); peft transposes when told.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in targeted),
    )


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """Around peft wrapping a model: peft reads transformers' ``is_gradient_checkpointing``,
    deprecated in transformers 5, and each wrap would warn so (a FutureWarning about peft)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        yield


def add_lora(model: PreTrainedModel, settings: LoraSettings | None = None) -> PeftModel:
    """Freeze ``model`` and wrap it with trainable LoRA matrices (peft ``get_peft_model``)."""
    config = lora_config(model, settings)
    with _peft_wrapping():
        return get_peft_model(model, config)


# ---------------------------------------------------------------- QLoRA


def load_4bit(
    name_or_path: str | os.PathLike, device: torch.device | str = "auto", **kwargs
) -> PreTrainedModel:
    """QLoRA's base: a causal LM with its linear layers in 4-bit NormalFloat with double
    quantisation (bitsandbytes ``Linear4bit``), others in the device policy's compute dtype.
    Embeddings and the output head stay unquantised, as in transformers. ``kwargs`` go to
    ``load_model``."""
    return load_model(name_or_path, device=device, quantization="nf4", double_quant=True, **kwargs)


def load_qlora(
    name_or_path: str | os.PathLike,
    settings: LoraSettings | None = None,
    device: torch.device | str = "auto",
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """QLoRA in one call: the base in 4-bit, prepared for k-bit training, with LoRA attached.

    ``prepare_model_for_kbit_training`` freezes the base and casts the remaining half-precision
    weights (norms, embeddings) to fp32 for stable training. Gradient checkpointing is left to
    the training loop (``TrainingConfig.gradient_checkpointing``), which uses the non-reentrant
    variant that needs no input-gradient hook.
    """
    model = load_4bit(name_or_path, device)
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return add_lora(model, settings)


def is_4bit(model: torch.nn.Module) -> bool:
    """True when the model holds bitsandbytes 4-bit weights (``Params4bit``)."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


# ---------------------------------------------------------------- reports and files


def _unique_parameters(model: torch.nn.Module):
    """``(name, parameter)`` once per stored tensor: parameters that share storage (a tied
    input/output embedding, peft's copy of it for the head) are one tensor, counted once."""
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p) if p.is_meta else p.data_ptr()  # meta tensors have no storage to compare
        if key not in seen:
            seen.add(key)
            yield name, p


def trainable_report(model: torch.nn.Module) -> dict:
    """Trainable parameters and what they are a share of; every stored tensor counted once (by
    ``data_ptr``), 4-bit weights counted unpacked (2 per stored byte).

    ``parameters`` is everything the adapted model holds, which is what peft's
    ``print_trainable_parameters`` divides by: with ``modules_to_save`` that includes a module
    twice (the frozen original and its trainable copy), so its share is diluted. The share here,
    ``trainable_share``, is of ``base_parameters``: the model's own parameters, without LoRA
    matrices or copies, i.e. what full fine-tuning would train.
    """
    trainable = total = lora = copies = 0
    for name, p in _unique_parameters(model):
        n = p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
        lora += n if "lora_" in name else 0
        copies += n if ".modules_to_save." in name else 0
    base = total - lora - copies
    return {
        "trainable_parameters": trainable,
        "lora_parameters": lora,
        "copied_parameters": copies,  # modules_to_save: trained in full next to the adapters
        "base_parameters": base,
        "parameters": total,
        "trainable_share": trainable / base if base else 0.0,
        "adapter_mb_fp32": 4 * trainable / 2**20,
        "base_in_4bit": is_4bit(model),
    }


def training_state_mb(model: torch.nn.Module) -> float:
    """Memory the weights, gradients and AdamW moments take, in MiB, activations not included.

    Trainable parameters: 16 bytes each in fp32 (weight, gradient, two moments). Frozen ones:
    their storage only (4 bytes fp32, 2 bf16, ~0.5 for nf4: Params4bit holds two per byte).
    Unlike a measured peak, this does not depend on what the process allocated before.
    """
    total = 0
    for _, p in _unique_parameters(model):
        total += 16 * p.numel() if p.requires_grad else p.numel() * p.element_size()
    return total / 2**20


def directory_size_mb(path: str | os.PathLike) -> float:
    """Size of the files under ``path`` in MiB (what a download or a disk quota sees)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def save_adapter(model: PeftModel, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write the adapter in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``):
    only the LoRA matrices, a few hundred KB to a few MB; the base is referenced, not copied."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs a peft model, got {type(model).__name__}")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    write_manifest(out_dir)  # last: the server refuses a folder that differs from it
    return out_dir


def load_adapter(
    base: PreTrainedModel | str | os.PathLike,
    adapter_dir: str | os.PathLike,
    trainable: bool = False,
    device: torch.device | str = "auto",
) -> PeftModel:
    """Put a saved adapter on a base model (a model, or a path/hub id loaded in fp32/bf16)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json (not a PEFT adapter)")
    if not isinstance(base, torch.nn.Module):
        base = load_model(base, device=device)
    with _peft_wrapping():
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)


def merge(model: PeftModel) -> PreTrainedModel:
    """Fold the LoRA update into the base weights and drop the peft wrappers (consumes ``model``)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"merge needs a peft model, got {type(model).__name__}")
    if is_4bit(model):
        raise ValueError(
            "merging into 4-bit weights re-quantises them and loses precision: load "
            "the base in full precision, load_adapter() onto it, then merge"
        )
    return model.merge_and_unload(safe_merge=True)


def merge_and_save(model: PeftModel, out_dir: str | os.PathLike, tokenizer=None) -> PreTrainedModel:
    """``merge`` and save as a plain Hugging Face model (safetensors); returns the merged model."""
    merged = merge(model)
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    write_manifest(out_dir)  # last: the server refuses a folder that differs from it
    return merged
