"""int8 absmax and nf4 quantization written out by hand, to check against bitsandbytes.

Each function is the few lines a library hides:

- **int8 absmax, vector-wise** (LLM.int8's weight format, Dettmers et al. 2022): every row gets
  one scale, its largest ``|w|``; ``code = round(w * 127 / absmax)`` in [-127, 127] and
  ``w ~ code * absmax / 127``. What ``bitsandbytes.functional.int8_vectorwise_quant`` returns as
  ``(CB, SCB)``.
- **nf4** (QLoRA, Dettmers et al. 2023): the weights are cut into blocks of 64 consecutive values
  (row-major), each block scaled by its absmax into [-1, 1] and every value replaced by the
  nearest of 16 fixed *NormalFloat* levels, which sit at quantiles of a standard normal (weights
  are roughly normal, so each level is used about equally often), with an exact zero. Stored:
  4-bit codes and one absmax per block. What ``bitsandbytes.functional.quantize_4bit(...,
  quant_type="nf4")`` stores, two codes per byte.
- **the Q4_1 grid** of GGUF files: blocks of 32 values stored as ``d * q + m`` with ``q`` in
  0..15. ``q4_1_grid_distance`` measures how far weights are from such a grid (0 for weights
  dequantized from Q4_1), ``off_grid`` moves them off it by up to half a step, a stand-in for
  the unquantized weights a GGUF file no longer holds.

Usage::

    from lmref.compression.by_hand import int8_absmax, nf4_quantize, nf4_dequantize

    codes, absmax = int8_absmax(weight)            # int8 codes, one scale per row
    codes4, scales = nf4_quantize(weight)          # codes 0..15, one absmax per 64 values
    error = nf4_dequantize(codes4, scales, weight.shape) - weight
"""

from __future__ import annotations

import torch
from scipy.stats import norm

NF4_BLOCK = 64
Q4_1_BLOCK = 32


def int8_absmax(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and the absmax of every row: ``round(w * 127 / absmax_row)``."""
    absmax = weight.abs().amax(dim=-1).float()
    codes = torch.round(weight.float() * (127.0 / absmax.unsqueeze(-1))).to(torch.int8)
    return codes, absmax


def int8_dequantize(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """``code * absmax / 127``: the values int8 absmax can represent."""
    return codes.float() * (absmax.unsqueeze(-1) / 127.0)


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat levels, from the normal distribution (QLoRA, appendix E).

    8 positive levels at the quantiles ``linspace(offset, 0.5, 9)`` of N(0, 1) and 7 negative
    ones at ``linspace(offset, 0.5, 8)``, plus an exact 0 (so padding and zeros stay exact),
    divided by the largest so the levels span [-1, 1]. ``offset`` keeps the outermost quantile
    finite: the mean of the quantile offsets for 16 and 15 bins, ``1 - (1/32 + 1/30) / 2``.
    """
    offset = 1 - (1 / 32 + 1 / 30) / 2
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())
    levels = torch.tensor([*positive, 0.0, *negative], dtype=torch.float64).sort().values
    return (levels / levels.max()).float()


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    flat = weight.reshape(-1).float()
    if flat.numel() % block:
        raise ValueError(f"{flat.numel()} values do not split into blocks of {block}")
    return flat.reshape(-1, block)


def nf4_quantize(
    weight: torch.Tensor, blocksize: int = NF4_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 (uint8, one per weight, ``weight``'s shape) and the absmax of every block.

    Nearest level = the interval between midpoints of neighbouring levels the scaled value falls
    in (``bucketize``); a value exactly on a midpoint takes the lower level, as bitsandbytes does.
    """
    blocks = _blocks(weight, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    levels = nf4_levels()
    midpoints = (levels[:-1] + levels[1:]) / 2
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return codes.reshape(weight.shape), absmax


def nf4_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...]
) -> torch.Tensor:
    """``level[code] * absmax_of_its_block``, in ``shape``."""
    blocks = nf4_levels()[codes.reshape(absmax.numel(), -1).long()]
    return (blocks * absmax.unsqueeze(1)).reshape(shape)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 4-bit storage to one code per value: high nibble first, then low."""
    packed = packed.reshape(-1).to(torch.uint8)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)


def q4_1_grid_distance(weight: torch.Tensor, block: int = Q4_1_BLOCK) -> torch.Tensor:
    """For every value: its distance to the nearest level ``min + q * step`` of its block's
    16-level uniform grid (``step = (max - min) / 15``), in steps (0 = on the grid, 0.5 = as far
    off as can be). GGUF's Q4_1 stores ``d * q + m`` with ``q`` in 0..15, its min at ``q = 0`` and
    its max at ``q = 15``, so dequantized Q4_1 weights sit at distance ~0."""
    blocks = _blocks(weight, block).double()
    low = blocks.amin(dim=1, keepdim=True)
    step = (blocks.amax(dim=1, keepdim=True) - low) / 15
    position = (blocks - low) / step.clamp(min=1e-30)
    return (position - position.round()).abs().float().reshape(weight.shape)


def off_grid(weight: torch.Tensor, block: int = Q4_1_BLOCK, seed: int = 0) -> torch.Tensor:
    """``weight`` moved off its Q4_1 grid: each value plus uniform noise of up to half its block's
    step either way, so rounding it back to that grid returns ``weight``. A stand-in for the
    continuous weights that were quantized (they are not in the file: any value in that interval
    rounds to the same level)."""
    blocks = _blocks(weight, block)
    step = (blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)) / 15
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(blocks.shape, generator=generator) - 0.5
    return (blocks + noise * step).reshape(weight.shape).to(weight.dtype)


def relative_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||``: the quantization error as a share of the weights."""
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()
