"""Pruning: magnitude, Wanda and N:M (2:4) sparsity for the linear layers of a causal LM.

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

Usage::

    from lmref.compression.pruning import PruneConfig, prune_model, sparsity_report

    calib = [torch.tensor(corpus["train"][:8]["input_ids"])]
    prune_model(model, PruneConfig(method="wanda", sparsity=0.5), calibration_batches=calib)
    print(sparsity_report(model)["global"])                         # 0.5
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune
from transformers.pytorch_utils import Conv1D

DEFAULT_SKIP = ("lm_head",)


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


def prune_scores(
    model: nn.Module,
    config: PruneConfig,
    modules: dict[str, nn.Module],
    calibration_batches: Iterable | None = None,
) -> dict[str, torch.Tensor]:
    """The score of every weight of ``modules``, (out, in) oriented: ``|W|`` for magnitude,
    ``|W| * ||X_j||`` for Wanda (one calibration pass over ``calibration_batches``)."""
    with torch.no_grad():
        scores = {name: out_in_weight(mod).detach().abs().float() for name, mod in modules.items()}
    if config.method == "wanda":
        if calibration_batches is None:
            raise ValueError("Wanda needs calibration_batches (input_ids from the corpus)")
        norms = collect_input_norms(model, calibration_batches, modules)
        scores = {name: s * norms[name].to(s.device)[None, :] for name, s in scores.items()}
    return scores


def prune_model(
    model: nn.Module, config: PruneConfig | None = None, calibration_batches: Iterable | None = None
) -> dict:
    """Prune ``model`` in place and make it permanent; returns ``sparsity_report`` of the result.

    Wanda needs ``calibration_batches`` (LongTensors of input_ids, or dicts with them), e.g. a
    few batches of the training corpus.
    """
    config = config or PruneConfig()
    modules = prunable_linears(model, config.skip)
    scores = prune_scores(model, config, modules, calibration_batches)

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
