"""A sparsity curve: quality against sparsity for several pruning methods, cheaply, on one model.

Pruning a 135M-parameter model with ``prune_model`` at each point of a curve repeats the same
work: the calibration pass, the scores, a ``topk`` over every weight matrix, and a copy of the
model. ``sparsity_curve`` does each once per method: it scores every weight, ranks the scores
once (per output row or per layer, the same groups ``prune_model`` uses), and then, for each
sparsity, zeroes the ``round(sparsity * group size)`` lowest-ranked weights of every group in
place, calls ``evaluate(model)`` and puts the dense weights back. The masks are those of
``prune_model`` with the same config (ties between equal scores may be broken differently);
N:M configs give one point each, at sparsity ``1 - n/m``.

Usage::

    from lmref.compression.curve import sparsity_curve

    rows = sparsity_curve(model, {"wanda": PruneConfig("wanda")}, [0.2, 0.5],
                          evaluate=lambda m: measure(m, valid, new_tokens=0).perplexity,
                          calibration_batches=[calib_ids])
    # [{"method": "wanda", "sparsity": 0.2, "achieved": 0.2, "value": ...}, ...]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from lmref.compression.pruning import (
    PruneConfig,
    n_m_mask,
    out_in_weight,
    prunable_linears,
    prune_scores,
)


def _ranks(score: torch.Tensor, scope: str) -> torch.Tensor:
    """Every score's rank within its group (0 = smallest): per row, or over the whole layer.

    numpy's argsort, not torch's: on CPU it is several times faster (numpy sorts with SIMD
    kernels), and sorting is most of the cost of a curve on a real model.
    """
    flat = score.detach().cpu().reshape(score.shape[0] if scope == "row" else 1, -1)
    order = torch.from_numpy(np.argsort(flat.numpy(), axis=1))
    dtype = torch.int16 if flat.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    positions = torch.arange(flat.shape[1], dtype=dtype).expand_as(order)
    ranks = torch.empty(order.shape, dtype=dtype).scatter_(1, order, positions)
    return ranks.reshape(score.shape).to(score.device)


def _restore(modules: dict[str, nn.Module], dense: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mod in modules.items():
            out_in_weight(mod).copy_(dense[name])


def _masks(
    config: PruneConfig, scores: dict[str, torch.Tensor], sparsities: Sequence[float]
) -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
    """(sparsity, keep-mask per layer) for each point of ``config``'s curve, ranking once."""
    if config.n_m is not None:
        n, m = config.n_m
        yield 1 - n / m, {name: n_m_mask(s, n, m) for name, s in scores.items()}
        return
    ranks = {name: _ranks(s, config.scope) for name, s in scores.items()}
    for sparsity in sparsities:
        yield (
            sparsity,
            {  # the round(sparsity * group) lowest scores go, as with topk
                name: r >= round(sparsity * (r.shape[1] if config.scope == "row" else r.numel()))
                for name, r in ranks.items()
            },
        )


@torch.no_grad()
def sparsity_curve(
    model: nn.Module,
    configs: dict[str, PruneConfig],
    sparsities: Sequence[float],
    evaluate: Callable[[nn.Module], float],
    calibration_batches: Sequence | None = None,
) -> list[dict]:
    """``evaluate(model)`` for every (config, sparsity); the model is dense again afterwards.

    ``configs`` maps a label to a ``PruneConfig`` (its ``sparsity`` is ignored; scope "row" or
    "layer"; an ``n_m`` config yields one point). Rows: method, sparsity (asked), achieved (the
    share of the pruned layers' weights set to zero), value (what ``evaluate`` returned).
    Sparsity 0 is the dense model: evaluated once, whatever the number of configs.
    """
    if not all(0.0 <= s < 1.0 for s in sparsities):
        raise ValueError(f"sparsities must lie in [0, 1), got {list(sparsities)}")
    skip = next(iter(configs.values())).skip if configs else ()
    modules = prunable_linears(model, skip)
    dense = {name: out_in_weight(mod).detach().clone() for name, mod in modules.items()}
    total = sum(w.numel() for w in dense.values())
    rows, dense_value = [], None
    try:
        for label, config in configs.items():
            if config.n_m is None and config.scope not in ("row", "layer"):
                raise ValueError(f"{label}: sparsity_curve ranks per 'row' or 'layer' only")
            if config.skip != skip:
                raise ValueError(f"{label}: every config must skip the same layers")
            _restore(modules, dense)  # score the dense model, not the last point's
            scores = prune_scores(model, config, modules, calibration_batches)
            for sparsity, keep in _masks(config, scores, sparsities):
                if sparsity == 0:
                    _restore(modules, dense)
                    dense_value = evaluate(model) if dense_value is None else dense_value
                    value, zeroed = dense_value, 0
                else:
                    for name, mod in modules.items():
                        out_in_weight(mod).copy_(dense[name] * keep[name])
                    value = evaluate(model)
                    zeroed = sum(int(k.numel() - k.count_nonzero()) for k in keep.values())
                rows.append(
                    {
                        "method": label,
                        "sparsity": sparsity,
                        "achieved": zeroed / total,
                        "value": value,
                    }
                )
            del scores
    finally:
        _restore(modules, dense)
    return rows
