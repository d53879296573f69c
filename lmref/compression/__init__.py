"""Compression stage: pruning (magnitude, Wanda, 2:4), quantization (int8, LLM.int8, nf4) and
the measurement of compressed models. Imports ``lmref.core`` and ``lmref.models``.

The public names of ``pruning``, ``quantization`` and ``measure`` are re-exported here, so a
notebook reads ``from lmref import compression as C; C.prune_model(...)``.
"""

from lmref.compression.measurement import (
    Measurement,
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
    "SAVE_SUPPORT",
    "Measurement",
    "PruneConfig",
    "collect_input_norms",
    "collect_input_stats",
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
    "pruning_leftovers",
    "quantize_int8_dynamic",
    "recover",
    "save_model",
    "sparsity_report",
    "synchronize",
    "timed",
]
