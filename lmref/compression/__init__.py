"""Compression stage: pruning (magnitude, Wanda, 2:4) and sparsity curves, quantization (int8,
LLM.int8, nf4), the same formats written by hand (``by_hand``) and the measurement of compressed
models. Imports ``lmref.core`` and ``lmref.models``.

The public names of ``pruning``, ``curve``, ``quantization`` and ``measurement`` are re-exported
here, so a notebook reads ``from lmref import compression as C; C.prune_model(...)``;
``by_hand`` is imported by name (``from lmref.compression import by_hand``).

Usage::

    from lmref import compression as C

    C.prune_model(model, C.PruneConfig("wanda", 0.5), calibration_batches=[ids])
    print(C.measure(model, valid_rows).decode)
"""

from lmref.compression.curve import sparsity_curve
from lmref.compression.measurement import (
    MATRIX_FLAGS,
    Measurement,
    cpu_features,
    disk_bytes,
    eval_batches,
    measure,
    memory_bytes,
    synchronize,
    timed,
)
from lmref.compression.pruning import (
    DEFAULT_SKIP,
    PruneConfig,
    collect_input_norms,
    collect_input_stats,
    is_n_m_sparse,
    make_permanent,
    n_m_mask,
    out_in_weight,
    prunable_linears,
    prune_model,
    prune_scores,
    pruning_leftovers,
    recover,
    sparsity_report,
)
from lmref.compression.quantization import (
    SAVE_SUPPORT,
    is_dynamic_quantized,
    load_bnb,
    quantize_int8_dynamic,
    save_model,
)

__all__ = [
    "DEFAULT_SKIP",
    "MATRIX_FLAGS",
    "SAVE_SUPPORT",
    "Measurement",
    "PruneConfig",
    "collect_input_norms",
    "collect_input_stats",
    "cpu_features",
    "disk_bytes",
    "eval_batches",
    "is_dynamic_quantized",
    "is_n_m_sparse",
    "load_bnb",
    "make_permanent",
    "measure",
    "memory_bytes",
    "n_m_mask",
    "out_in_weight",
    "prunable_linears",
    "prune_model",
    "prune_scores",
    "pruning_leftovers",
    "quantize_int8_dynamic",
    "recover",
    "save_model",
    "sparsity_curve",
    "sparsity_report",
    "synchronize",
    "timed",
]
