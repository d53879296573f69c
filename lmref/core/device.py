"""The one device and precision policy of lmref: where a model runs and in which dtype, decided here.

Every module that loads, trains, quantizes or serves a model asks this module instead of
deciding for itself (``lmref.models.loading``, ``lmref.training.loop``, ``lmref.training.lora``,
``lmref.compression.methods``, ``lmref.serving.engine`` import it and say so), so a GPU without bf16 gets the
same answer everywhere. The policy, and why:

- **device**: ``cuda`` when present, else ``cpu``. Apple ``mps`` is left out on purpose: its
  bf16, ``torch.compile`` and bitsandbytes support differ between macOS and torch releases.
- **precision** on CUDA: ``bf16`` where the GPU has it (Ampere and later): fp32's exponent range,
  so no loss scaling. Older GPUs get ``fp16``, which needs a gradient scaler in training.
- **precision** on CPU: ``fp32``. CPU bf16 exists, but on most CPUs its matmuls are slower than
  fp32 (only AMX/AVX512-BF16 parts gain), and the course's numbers must not depend on that.

Usage::

    from lmref.core.device import resolve_device, select_precision, compute_dtype

    device = resolve_device("auto")                 # cuda if present, else cpu
    select_precision(device)                        # "bf16" | "fp16" | "fp32"
    model.to(device, compute_dtype(device))         # the dtype that precision stands for
"""

from __future__ import annotations

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """``cuda`` when present, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str = "auto") -> torch.device:
    """``"auto"`` becomes ``default_device()``; anything else is taken as asked."""
    return default_device() if str(device) == "auto" else torch.device(device)


def select_precision(device: torch.device | str = "auto", requested: str = "auto") -> str:
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU; or ``requested`` as is."""
    if requested not in {"auto", *PRECISIONS}:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {requested!r}")
    if requested != "auto":
        return requested
    if resolve_device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def compute_dtype(device: torch.device | str = "auto", requested: str = "auto") -> torch.dtype:
    """The torch dtype of ``select_precision``: what weights are loaded in and computed in."""
    return PRECISIONS[select_precision(device, requested)]
