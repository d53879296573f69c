"""bitsandbytes models: the quantization config, and the setup step run where they are loaded.

``quantization_config`` builds transformers' ``BitsAndBytesConfig`` for LLM.int8 ("int8") or
4-bit ("nf4", "fp4"). ``prepare_bitsandbytes`` is the explicit setup step: the loader
(``lmref.models.loading.load_model``) calls it before it quantizes a model while loading, and
before it loads a folder saved quantized. Nothing here runs on import: importing lmref leaves
bitsandbytes and the logging configuration as they were.

Usage::

    from lmref.models.quantized import prepare_bitsandbytes, quantization_config

    prepare_bitsandbytes("nf4")     # the exact CPU 4-bit unpacking, quiet CPU kernels
    config = quantization_config("nf4", torch.float32, double_quant=True)
"""

from __future__ import annotations

import logging

import torch

MODES = ("int8", "nf4", "fp4")


def quantization_config(
    mode: str,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    skip_modules: list[str] | None = None,
):
    """transformers' ``BitsAndBytesConfig`` for "int8" (LLM.int8), "nf4" or "fp4".

    ``skip_modules=None`` keeps transformers' own choice of unquantized modules (the output
    head, and whatever is tied to it), which for the course's models is ``["lm_head"]``.
    """
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant,
            llm_int8_skip_modules=skip_modules,
        )
    raise ValueError(f"quantization must be one of {MODES} or None, not {mode!r}")


def prepare_bitsandbytes(mode: str = "nf4") -> bool:
    """The setup step for a bitsandbytes model in ``mode``; idempotent. False without bitsandbytes.

    - LLM.int8 on CPU computes in fp16 by design, and bitsandbytes logs a warning saying so on
      every matmul call: thousands of lines per evaluation. That logger is set to ERROR.
    - 4-bit: bitsandbytes >= 0.50, on CPUs with AVX512-BF16, tries to fetch a faster 4-bit
      kernel from the Hugging Face hub through the optional ``kernels`` package, and warns when
      it cannot. Offline its built-in kernel is the intended path, so the warning is noise; that
      logger is set to ERROR (the warning comes when bitsandbytes is first imported, so this
      silences it only when the step runs before that import: peft imports bitsandbytes too).
      And ``fix_bitsandbytes_cpu_unpacking`` makes saving a 4-bit model exact.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "int8":
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return _bitsandbytes_installed()
    quiet_cpu_kernel_notice()
    return fix_bitsandbytes_cpu_unpacking()


def quiet_cpu_kernel_notice() -> None:
    """Silence bitsandbytes' notice that the optional hub kernel for 4-bit CPU matmuls is missing.

    bitsandbytes >= 0.50, on CPUs with AVX512-BF16, tries at its import to fetch a faster kernel
    through the optional ``kernels`` package and logs "Failed to load CPU gemm_4bit_forward"
    when it cannot; offline its built-in kernel is the intended path. The notice comes at import,
    and transformers imports bitsandbytes through peft, so a process that wants it quiet calls
    this first (``python -m lmref.train`` does, in ``main``).
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _bitsandbytes_installed() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def fix_bitsandbytes_cpu_unpacking() -> bool:
    """Make bitsandbytes' undoing of its CPU 4-bit layout exact (idempotent; False without it).

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
    the dependency range (<0.51) keeps it checked by tests/test_compression.py. Applied by
    ``prepare_bitsandbytes``, never on import.
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
