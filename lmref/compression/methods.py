"""Model compression: pruning (magnitude, Wanda, N:M) and quantization (int8 dynamic, bitsandbytes),
with one measurement helper so every variant is judged on the same numbers.

Pruning zeroes weights of the linear layers -- ``nn.Linear``, and transformers' ``Conv1D`` of
GPT-2-style models, whose weight is stored transposed (in x out) and is handled in (out x in)
orientation here (``out_in_weight``) -- ``lm_head`` is left alone by default: it is tied to the
embeddings in small models and every token's logits go through it:

- **magnitude**: drop the weights with the smallest ``|W|``, per layer or over all layers at once
  (``torch.nn.utils.prune``, which picks exactly ``round(sparsity * n)`` weights with ``topk``);
- **Wanda** (Sun et al., 2023): drop the smallest ``|W_ij| * ||X_j||_2``, where ``||X_j||`` is the
  L2 norm of input channel ``j`` over calibration tokens; compared within each output row, as in
  the paper. The norms come from one forward pass of the dense model through forward hooks that
  are removed afterwards (the paper's reference code prunes layer by layer and feeds the pruned
  outputs on; on a model this small the difference is below the noise of our evaluation);
- **N:M** semi-structured (2:4): in every group of ``m`` consecutive input weights of a row keep
  the ``n`` with the largest score, the pattern sparse tensor cores (and
  ``torch.sparse.to_sparse_semi_structured``) run at up to 2x.

Pruning is made permanent (``prune.remove``): no masks, ``weight_orig`` or hooks are left, so
the model saves and loads as a plain model. ``recover`` fine-tunes a pruned model with the masks
re-attached, so its zeros stay zero, through any training function you pass in.

Quantization: ``quantize_int8_dynamic`` (int8 weights, activations quantized on the fly, for CPU
inference; see its docstring for why it is ``torch.ao`` and not torchao), and ``load_bnb`` for
bitsandbytes LLM.int8 and 4-bit nf4/fp4 through transformers' ``BitsAndBytesConfig``, in the
compute dtype of ``lmref.core.device`` (the project's one device/dtype policy; copy it along).

``measure`` gives size in memory and on disk, validation perplexity (exp of the token-weighted
mean NLL), prefill and generation tokens/s on the model's device, for any of these variants.

Usage::

    from lmref.compression.methods import (PruneConfig, prune_model, sparsity_report, quantize_int8_dynamic,
                                   load_bnb, save_model, measure)

    calib = [torch.tensor(corpus["train"][:8]["input_ids"])]
    prune_model(model, PruneConfig(method="wanda", sparsity=0.5), calibration_batches=calib)
    print(sparsity_report(model)["global"])                         # 0.5
    save_model(model, "artifacts/base-wanda50")                     # a plain HF folder
    q = quantize_int8_dynamic(model)                                # CPU int8, not saveable
    nf4 = load_bnb("artifacts/base", "nf4")                         # bitsandbytes 4-bit
    print(measure(nf4, corpus["validation"], name="nf4").as_row())
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from transformers.pytorch_utils import Conv1D

from lmref.core.device import compute_dtype as policy_dtype
from lmref.core.device import resolve_device

DEFAULT_SKIP = ("lm_head",)

# LLM.int8 on CPU computes in fp16 by design, and bitsandbytes logs a warning saying so on every
# matmul call: thousands of lines per evaluation.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def fix_bitsandbytes_cpu_unpacking() -> bool:
    """Make bitsandbytes' undoing of its CPU 4-bit layout exact (applied when this module loads).

    bitsandbytes 0.50, on CPUs with AVX512-BF16, repacks each ``Linear4bit`` for its CPU kernel on
    the first inference forward: nibbles reordered, ``absmax`` cast to bf16 and stored as
    [blocks, N], double quantization unpacked. Every ``state_dict()`` (``save_pretrained``, peft's
    adapter saving, ``memory_bytes``) first undoes that through
    ``_convert_weight_packed_for_cpu_inverse``, which restores the nibbles but leaves ``absmax``
    in [blocks, N] order (or re-quantizes it when nested). The saved folder then reloads as
    garbage (SmolLM2-135M: perplexity 19 -> 10 million) and the model in memory is damaged too.
    The wrapper below puts ``absmax`` back in row order, in fp32, un-nested: exactly the scales
    the model computed with, so save/reload and the next forward reproduce the same logits.
    A patch of a private function, on purpose: it is the one place all those paths go through;
    the dependency range (<0.51) keeps it checked by tests/test_compression.py.
    """
    try:
        from bitsandbytes import functional
        from bitsandbytes import nn as bnb_nn
    except ImportError:
        return False
    original = functional._convert_weight_packed_for_cpu_inverse
    if getattr(original, "lmref_exact", False):
        return True

    def exact_inverse(packed_weight, quant_state, block_n: int = 32):
        absmax = quant_state.absmax.T.reshape(-1).float()  # [K/blocksize, N] -> [N*K/blocksize]
        quant_state.original_nested = False  # keep the scales, not re-quantized
        weight, state = original(packed_weight, quant_state, block_n)
        state.absmax = absmax
        return weight, state

    exact_inverse.lmref_exact = True
    functional._convert_weight_packed_for_cpu_inverse = exact_inverse
    bnb_nn.modules._convert_weight_packed_for_cpu_inverse = exact_inverse
    return True


fix_bitsandbytes_cpu_unpacking()

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


# ----------------------------------------------------------------------------------------- pruning


@dataclass
class PruneConfig:
    """What to prune and how.

    ``method``: "magnitude" (score |W|) or "wanda" (score |W| * input-channel norm).
    ``sparsity``: share of each scored group set to zero (for N:M it is ``1 - n/m`` and ignored).
    ``scope``: the group within which scores compete: "layer" (each weight matrix), "row" (each
    output row, Wanda's default) or "global" (all pruned layers together); None picks "layer" for
    magnitude and "row" for Wanda.
    ``n_m``: e.g. (2, 4) for semi-structured 2:4; overrides ``sparsity`` and ``scope``.
    ``skip``: module names (or name suffixes) not to prune.
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str | None = None
    n_m: tuple[int, int] | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        if self.method not in ("magnitude", "wanda"):
            raise ValueError(f"method must be 'magnitude' or 'wanda', not {self.method!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope is None:
            self.scope = "row" if self.method == "wanda" else "layer"
        if self.scope not in ("layer", "row", "global"):
            raise ValueError(f"scope must be 'layer', 'row' or 'global', not {self.scope!r}")
        if self.n_m is not None:
            n, m = self.n_m
            if not (0 < n < m):
                raise ValueError(f"n_m must satisfy 0 < n < m, got {self.n_m}")


def prunable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, nn.Module]:
    """The linear layers (``nn.Linear``, GPT-2's ``Conv1D``) pruning touches, by qualified name
    (``skip`` names excluded)."""
    skip = tuple(skip)
    found = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, Conv1D))
        and not any(name == s or name.endswith("." + s) for s in skip)
    }
    if not found:
        raise ValueError(
            "the model has no nn.Linear or Conv1D layers to prune (already quantized?)"
        )
    return found


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): ``Conv1D`` stores it transposed (a view here)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _as_stored(module: nn.Module, out_in: torch.Tensor) -> torch.Tensor:
    """A mask or score in (out, in) orientation, laid out like ``module.weight``."""
    return out_in.T.contiguous() if isinstance(module, Conv1D) else out_in


def _batch_input_ids(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict) and "input_ids" in batch:
        ids = batch["input_ids"]
        return ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)
    raise TypeError("calibration batches must be LongTensors or dicts with 'input_ids'")


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    batches: Iterable,
    modules: dict[str, nn.Module],
) -> dict[str, dict[str, torch.Tensor]]:
    """Per input channel of each of ``modules``, over all calibration tokens: the L2 ``norm``
    (Wanda's score) and the largest magnitude ``absmax`` (what int8 activation scales and
    LLM.int8's outlier threshold see).

    Forward hooks accumulate the statistics; they are removed in ``finally`` so a failing batch
    cannot leave them behind.
    """
    width = {name: out_in_weight(mod).shape[1] for name, mod in modules.items()}
    sums = {name: torch.zeros(w, dtype=torch.float64) for name, w in width.items()}
    absmax = {name: torch.zeros(w) for name, w in width.items()}
    counts = dict.fromkeys(modules, 0)

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[name] += x.double().pow(2).sum(0).cpu()
            absmax[name] = torch.maximum(absmax[name], x.abs().amax(0).float().cpu())
            counts[name] += x.shape[0]

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in modules.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(input_ids=_batch_input_ids(batch).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not any(counts.values()):
        raise ValueError("no calibration tokens: pass at least one batch of input_ids")
    return {name: {"norm": sums[name].sqrt().float(), "absmax": absmax[name]} for name in modules}


def collect_input_norms(
    model: nn.Module,
    batches: Iterable,
    modules: dict[str, nn.Module],
) -> dict[str, torch.Tensor]:
    """L2 norm of every input channel of ``modules`` over all calibration tokens (Wanda's score)."""
    return {
        name: stats["norm"] for name, stats in collect_input_stats(model, batches, modules).items()
    }


def _row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = round(sparsity * score.shape[1])
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return mask


def n_m_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive scores along the input dimension."""
    out_features, in_features = score.shape
    if in_features % m:
        raise ValueError(f"in_features={in_features} is not a multiple of m={m}")
    groups = score.reshape(out_features, in_features // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2).indices, True)
    return mask.reshape(out_features, in_features)


def is_n_m_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive input weights has at most ``n`` non-zeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(1) <= n).all())


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight and drop ``weight_orig``, masks and hooks."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def pruning_leftovers(model: nn.Module) -> list[str]:
    """Names of modules still carrying masks, ``*_orig`` parameters or forward hooks (want: [])."""
    left = []
    for name, module in model.named_modules():
        if (
            module._forward_hooks
            or module._forward_pre_hooks
            or any(n.endswith("_orig") for n, _ in module.named_parameters(recurse=False))
            or any(n.endswith("_mask") for n, _ in module.named_buffers(recurse=False))
        ):
            left.append(name or "<root>")
    return left


def prune_model(
    model: nn.Module, config: PruneConfig | None = None, calibration_batches: Iterable | None = None
) -> dict:
    """Prune ``model`` in place and make it permanent; returns ``sparsity_report`` of the result.

    Wanda needs ``calibration_batches`` (LongTensors of input_ids, or dicts with them), e.g. a
    few batches of the training corpus.
    """
    config = config or PruneConfig()
    modules = prunable_linears(model, config.skip)
    with torch.no_grad():
        scores = {name: out_in_weight(mod).detach().abs().float() for name, mod in modules.items()}
    if config.method == "wanda":
        if calibration_batches is None:
            raise ValueError("Wanda needs calibration_batches (input_ids from the corpus)")
        norms = collect_input_norms(model, calibration_batches, modules)
        scores = {name: s * norms[name].to(s.device)[None, :] for name, s in scores.items()}

    if config.n_m is not None:
        n, m = config.n_m
        for name, mod in modules.items():
            prune.custom_from_mask(mod, "weight", _as_stored(mod, n_m_mask(scores[name], n, m)))
    elif config.sparsity == 0:
        pass
    elif config.scope == "global":
        # Library code: one topk over every score at once, exactly round(sparsity * total) pruned.
        prune.global_unstructured(
            [(mod, "weight") for mod in modules.values()],
            pruning_method=prune.L1Unstructured,
            amount=config.sparsity,
            importance_scores={
                (mod, "weight"): _as_stored(mod, scores[name]) for name, mod in modules.items()
            },
        )
    elif config.scope == "layer":
        for name, mod in modules.items():
            prune.l1_unstructured(
                mod,
                "weight",
                amount=config.sparsity,
                importance_scores=_as_stored(mod, scores[name]),
            )
    else:  # row: torch.nn.utils.prune has no per-row unstructured method, so the mask is ours
        for name, mod in modules.items():
            prune.custom_from_mask(
                mod, "weight", _as_stored(mod, _row_mask(scores[name], config.sparsity))
            )
    make_permanent(model)
    return sparsity_report(model, config.skip)


def sparsity_report(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> dict:
    """Share of zero weights per prunable layer and over all of them (``global``)."""
    layers, zeros, total = {}, 0, 0
    for name, mod in prunable_linears(model, skip).items():
        z, n = int((mod.weight == 0).sum()), mod.weight.numel()
        layers[name] = z / n
        zeros, total = zeros + z, total + n
    return {"global": zeros / total, "zeros": zeros, "weights": total, "layers": layers}


def recover(
    model: nn.Module, train_fn: Callable[[nn.Module], object], skip: Iterable[str] = DEFAULT_SKIP
) -> object:
    """Short recovery fine-tune of a pruned model that keeps its zeros.

    The current zero pattern is re-attached as a pruning mask (``weight = weight_orig * mask`` in
    every forward, so pruned weights get no gradient), ``train_fn(model)`` trains (pass e.g.
    ``lambda m: train(m, corpus["train"], config)``), then the masks are folded in again.
    """
    for mod in prunable_linears(model, skip).values():
        prune.custom_from_mask(mod, "weight", mod.weight.detach() != 0)
    try:
        return train_fn(model)
    finally:
        make_permanent(model)


# ------------------------------------------------------------------------------------ quantization


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


def bnb_config(
    mode: str,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    skip: Iterable[str] = DEFAULT_SKIP,
):
    """transformers' ``BitsAndBytesConfig`` for "int8" (LLM.int8), "nf4" or "fp4"."""
    from transformers import BitsAndBytesConfig

    skip = list(skip)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant,
            llm_int8_skip_modules=skip,
        )
    raise ValueError(f"mode must be 'int8', 'nf4' or 'fp4', not {mode!r}")


def load_bnb(
    name_or_path: str | Path,
    mode: str,
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = False,
):
    """Load a causal LM with bitsandbytes weights ("int8", "nf4", "fp4") on ``device``.

    Quantization happens while loading, from any HF folder or hub id. bitsandbytes >= 0.49 runs
    these on CPU too (slowly: its CPU kernels dequantize per matmul); on a GPU they save memory.
    A folder saved from such a model (``save_model``) reloads already quantized.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device or "auto")
    compute_dtype = compute_dtype or policy_dtype(device)
    return AutoModelForCausalLM.from_pretrained(
        str(name_or_path),
        quantization_config=bnb_config(mode, compute_dtype, double_quant),
        device_map={"": device},
        dtype=compute_dtype,
        use_safetensors=True,
    ).eval()


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
    return out_dir


# ------------------------------------------------------------------------------------- measurement


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters, persistent buffers, quantized packs, scales).

    Counted from ``state_dict`` so it covers torch.ao packed int8 weights and bitsandbytes
    quantization states, which ``parameters()`` misses; shared (tied) tensors count once.
    """
    seen: set[tuple] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, (tuple, list)):
            for x in t:
                add(x)
            return
        if not isinstance(t, torch.Tensor):
            return
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()
        if t.is_quantized and t.qscheme() in (
            torch.per_channel_affine,
            torch.per_channel_symmetric,
        ):
            total += (
                t.q_per_channel_scales().numel() * 8 + t.q_per_channel_zero_points().numel() * 8
            )

    for value in model.state_dict(keep_vars=True).values():
        add(value)
    return total


def disk_bytes(path: str | Path, pattern: str = "*") -> int:
    """Bytes of the files in a saved folder (``pattern="*.safetensors"`` for the weights only)."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def _eval_input_ids(dataset) -> torch.Tensor:
    if isinstance(dataset, torch.Tensor):
        return dataset
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        return torch.tensor(dataset["input_ids"])
    return torch.tensor([list(row["input_ids"]) for row in dataset])


@dataclass
class Measurement:
    """One variant's numbers; ``as_row()`` gives a flat dict for a table."""

    name: str
    device: str
    memory_mb: float
    disk_mb: float | None
    loss: float
    perplexity: float
    eval_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def as_row(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure(
    model: nn.Module,
    eval_dataset,
    name: str = "model",
    saved_dir: str | Path | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    prompt_tokens: int = 16,
    new_tokens: int = 32,
    gen_batch_size: int = 1,
    repeats: int = 3,
) -> Measurement:
    """Size, quality and speed of one model variant, the same way for every variant.

    - memory: ``memory_bytes``; disk: the bytes of every file in ``saved_dir`` (None if not saved);
    - perplexity: exp(sum of token NLL / number of predicted tokens) over ``eval_dataset`` (rows of
      ``input_ids``), accumulated in float64; the same pass gives prefill tokens/s;
    - decode tokens/s: greedy ``generate`` of exactly ``new_tokens`` from ``prompt_tokens``-token
      prompts, best of ``repeats`` after a warm-up (best-of, because on a shared machine the other
      runs measure the neighbours' load, not the model); ``new_tokens=0`` skips it (NaN).
    """
    ids = _eval_input_ids(eval_dataset)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(
            f"eval_dataset must hold rows of >= 2 token ids, got shape {tuple(ids.shape)}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens, elapsed = 0.0, 0, 0.0
    batches = list(ids.split(batch_size))[:max_batches]
    for batch in batches:
        batch = batch.to(device)
        start = time.perf_counter()
        logits = model(input_ids=batch).logits
        elapsed += time.perf_counter() - start
        nll += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).double(), batch[:, 1:].flatten(), reduction="sum"
        ).item()
        tokens += batch[:, 1:].numel()
    prefill = sum(b.numel() for b in batches) / elapsed

    prompts = ids[:gen_batch_size, :prompt_tokens].to(device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    gen = dict(do_sample=False, pad_token_id=pad, attention_mask=torch.ones_like(prompts))
    if new_tokens > 0:
        model.generate(prompts, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
    best = math.inf
    for _ in range(repeats if new_tokens > 0 else 0):
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)
        best = min(best, time.perf_counter() - start)
    model.train(was_training)
    loss = nll / tokens
    return Measurement(
        name=name,
        device=str(device),
        memory_mb=memory_bytes(model) / 2**20,
        disk_mb=disk_bytes(saved_dir) / 2**20 if saved_dir is not None else None,
        loss=loss,
        perplexity=math.exp(loss),
        eval_tokens=tokens,
        prefill_tokens_per_s=prefill,
        decode_tokens_per_s=gen_batch_size * new_tokens / best if new_tokens > 0 else math.nan,
    )
