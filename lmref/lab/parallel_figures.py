"""Diagrams for notebook 10: which rank holds what under FSDP, tensor and pipeline parallelism.

Usage::

    from lmref.lab.parallel_figures import draw_layouts

    fig = draw_layouts(ranks=2, layers=4)
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")


def _grid(ax, title: str, layers: int, owner, note: str) -> None:
    """A column per layer, two matrices (attention, MLP) each, cut by ``owner(layer, part)``:
    a list of (rank, x0, width, y0, height) pieces in the unit square of that matrix."""
    for layer in range(layers):
        for part in range(2):
            x, y = layer * 1.2, part * 1.2
            for rank, x0, w, y0, h in owner(layer, part):
                ax.add_patch(
                    Rectangle((x + x0, y + y0), w, h, color=COLORS[rank % 4], ec="white", lw=1.5)
                )
                ax.text(x + x0 + w / 2, y + y0 + h / 2, f"r{rank}", ha="center", va="center",
                        color="white", fontsize=8)  # fmt: skip
        ax.text(layer * 1.2 + 0.5, -0.25, f"layer {layer}", ha="center", fontsize=8)
    ax.text(-0.15, 0.5, "attn", rotation=90, ha="right", va="center", fontsize=8)
    ax.text(-0.15, 1.7, "MLP", rotation=90, ha="right", va="center", fontsize=8)
    ax.set(xlim=(-0.4, layers * 1.2), ylim=(-0.8, 2.4), title=title)
    ax.text(layers * 0.6, -0.65, note, ha="center", fontsize=8, style="italic")
    ax.axis("off")


def draw_layouts(ranks: int = 2, layers: int = 4) -> plt.Figure:
    """Three panels: FSDP (every matrix's rows split, gathered whole for its compute), Megatron
    TP (attention's q/k/v and the MLP's up split by columns, the output projections by rows),
    PP (whole layers per rank)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    cut = 1 / ranks
    _grid(axes[0], "FSDP / ZeRO-3: a shard of every matrix", layers,
          lambda layer, part: [(r, 0, 1, r * cut, cut) for r in range(ranks)],
          "all-gather before use, reduce-scatter grads")  # fmt: skip
    _grid(axes[1], "tensor parallel: columns, then rows", layers,
          lambda layer, part: [(r, r * cut, cut, 0, 1) for r in range(ranks)],
          "all-reduce activations in every layer")  # fmt: skip
    _grid(axes[2], "pipeline parallel: whole layers", layers,
          lambda layer, part: [(layer * ranks // layers, 0, 1, 0, 1)],
          "send activations between stages")  # fmt: skip
    fig.tight_layout()
    return fig
