"""Measurement of a model variant (dense, pruned, quantized): size, quality and speed, one way.

``measure`` gives size in memory and on disk, validation loss and perplexity through the one
loss of ``lmref.core.losses`` (labels shifted, ``IGNORE_INDEX`` and padding not counted,
token-weighted), prefill and generation tokens/s on the model's device; generation speed is the
median and range of repeats (``Measurement.decode``, a ``lmref.core.stats.Spread``), so two
variants are compared with ``compare``, not by their digits. Every clock read on a GPU waits for
the queued kernels first (``timed``): CUDA runs asynchronously, so an unsynchronized clock
measures how fast work was queued, not how fast it ran. ``cpu_features`` names the matrix
instructions the CPU has (AVX-512 VNNI, AMX, ...): CPU speed results hold for that CPU only.

Usage::

    from lmref.compression.measurement import measure, memory_bytes

    m = measure(model, corpus["validation"], name="nf4", repeats=5)
    print(m.as_row(), m.decode)                # decode: "14.1 (12.9-15.0, 5 repeats)"
    memory_bytes(model)                        # bytes of weights, packs and scales
    cpu_features()                             # e.g. ["avx2", "avx512f", "avx512_vnni", "amx_int8"]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from lmref.core.losses import loss_sum_from_logits
from lmref.core.stats import Spread

T = TypeVar("T")

# CPU flags that decide how fast int8 / bf16 matrix products can run (Linux /proc/cpuinfo names):
# AVX-512 VNNI (and AVX-VNNI) add int8 dot-product instructions, AVX512-BF16 bf16 ones, AMX
# (Intel Sapphire Rapids and later) tile units for int8 and bf16 matrix products.
MATRIX_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The ``MATRIX_FLAGS`` this CPU reports, in that order ([] where /proc/cpuinfo is missing)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return [flag for flag in MATRIX_FLAGS if flag in flags]


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work (a no-op on CPU, which is synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device | str, fn: Callable[..., T], *args, **kwargs) -> tuple[T, float]:
    """``fn(*args, **kwargs)`` and its wall-clock seconds, ``device`` synchronized before each
    clock read."""
    synchronize(device)  # earlier queued work is not this call's
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize(device)
    return result, time.perf_counter() - start


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


@dataclass
class Measurement:
    """One variant's numbers; ``as_row()`` gives a flat dict for a table.

    ``decode_tokens_per_s`` is the median of ``decode_repeats`` timed generations, between
    ``decode_low`` and ``decode_high``; ``decode`` gives the three as a ``Spread``. Prefill is one
    timed pass over the evaluation batches (no warm-up, no repeats): indicative only.
    """

    name: str
    device: str
    memory_mb: float
    disk_mb: float | None
    loss: float
    perplexity: float
    eval_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_low: float = math.nan
    decode_high: float = math.nan
    decode_repeats: int = 0

    @property
    def decode(self) -> Spread | None:
        """Decode tokens/s as median and range of the repeats (None when not measured)."""
        if not self.decode_repeats:
            return None
        return Spread(
            self.decode_tokens_per_s, self.decode_low, self.decode_high, self.decode_repeats
        )

    def as_row(self) -> dict:
        return asdict(self)


COLUMNS = ("input_ids", "labels", "attention_mask")


def _columns(dataset) -> dict[str, torch.Tensor]:
    if isinstance(dataset, torch.Tensor):
        return {"input_ids": dataset}
    if isinstance(dataset, dict):  # columns: {"input_ids": rows, "labels": rows, ...}
        return {k: torch.as_tensor(dataset[k]) for k in COLUMNS if k in dataset}
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        return {k: torch.tensor(dataset[k]) for k in COLUMNS if k in dataset.column_names}
    rows = list(dataset)
    return {k: torch.tensor([list(r[k]) for r in rows]) for k in COLUMNS if rows and k in rows[0]}


def eval_batches(dataset, batch_size: int, max_batches: int | None = None) -> list[dict]:
    """Batches (dicts of tensors) of ``input_ids``, with ``labels`` and ``attention_mask`` where
    the data has them, from a LongTensor of rows, a dict of such columns, a ``datasets.Dataset``
    or a list of dict rows (rows of one length: pad them first)."""
    columns = _columns(dataset)
    ids = columns.get("input_ids")
    if ids is None or ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        shape = None if ids is None else tuple(ids.shape)
        raise ValueError(f"eval_dataset must hold rows of >= 2 token ids, got shape {shape}")
    splits = {key: value.split(batch_size) for key, value in columns.items()}
    batches = [dict(zip(splits, parts)) for parts in zip(*splits.values())]
    return batches[:max_batches]


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
    - loss and perplexity: ``lmref.core.losses``' token-weighted NLL over ``eval_dataset`` (rows
      of ``input_ids``, optionally ``labels`` and ``attention_mask``: see ``eval_batches``),
      summed in float64; the same pass gives prefill tokens/s (positions run per second);
    - decode tokens/s: greedy ``generate`` of exactly ``new_tokens`` from ``prompt_tokens``-token
      prompts, ``repeats`` times after a warm-up: the median, and the range as
      ``decode_low``/``decode_high`` (on a shared machine repeats move tens of percent, so compare
      variants with ``lmref.core.stats.compare(a.decode, b.decode)``); ``new_tokens=0`` skips it
      (NaN).
    """
    batches = eval_batches(eval_dataset, batch_size, max_batches)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens, elapsed = 0.0, 0, 0.0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        out, seconds = timed(
            device, model, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        )
        elapsed += seconds
        loss, counted = loss_sum_from_logits(out.logits, batch, dtype=torch.float64)
        nll, tokens = nll + float(loss), tokens + int(counted)
    if tokens == 0:
        raise ValueError("no tokens to evaluate: every label is -100 or padding")
    prefill = sum(b["input_ids"].numel() for b in batches) / elapsed

    rows = {key: torch.cat([b[key] for b in batches])[:gen_batch_size] for key in batches[0]}
    prompts = rows["input_ids"][:, :prompt_tokens].to(device)
    mask = rows.get("attention_mask")
    mask = torch.ones_like(prompts) if mask is None else mask[:, :prompt_tokens]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    gen = dict(do_sample=False, pad_token_id=pad, attention_mask=mask.to(device))
    if new_tokens > 0:
        model.generate(prompts, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
    rates = []
    for _ in range(repeats if new_tokens > 0 else 0):
        _, seconds = timed(
            device,
            model.generate,
            prompts,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            **gen,
        )
        rates.append(gen_batch_size * new_tokens / seconds)
    decode = Spread.of(rates) if rates else None
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
        decode_tokens_per_s=decode.median if decode else math.nan,
        decode_low=decode.low if decode else math.nan,
        decode_high=decode.high if decode else math.nan,
        decode_repeats=decode.repeats if decode else 0,
    )
