"""What one served model version is: ``ModelSpec``, a name clients use and where its weights are,
with how the engine batches it. The engine, the config, the command line (its fields become
``python -m lmref.serve`` flags) and the Batch worker all read it; ``lmref.serving.engine``
re-exports it.

Usage::

    from lmref.serving.spec import ModelSpec

    ModelSpec("base", "artifacts/base", max_batch_size=8)
    ModelSpec("hub", "HuggingFaceTB/SmolLM2-135M", allow_unmanifested=True)   # with a warning
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The decode step's weights (lmref.serving.fused_llama.SmallLinear says what each costs; int8
# runs through lmref.serving.matvec.Int8Linear where its kernel is built).
DecodeWeights = Literal["same", "fp16", "int8", "int8-bf16", "int8-dynamic"]


@dataclass
class ModelSpec:
    """One served model version: a name clients use and a Hugging Face folder (safetensors)."""

    name: str
    path: str
    # Rows (prompts) decoding together; 1 turns batching off. A Llama's slot cache is allocated
    # for this many rows at start and kept (SmolLM2-135M fp32: 11 MiB a row of 256 tokens).
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0  # how long an idle worker gathers requests (a busy one: none)
    prefill_chunk_tokens: int = 256  # prompt columns per prefill forward; decode steps between
    prefix_cache_min_tokens: int = 16  # a shared prompt start this long is computed once; 0: off
    # At start, this many tokens in each of max_batch_size prompts are prefilled and stepped once,
    # so the first burst meets memory already touched (lmref.serving.warm_up); 0: no warm-up.
    warm_up_tokens: int = 32
    max_queue_size: int = 256  # rows waiting; more -> QueueFull (the app answers 429)
    device: str = "auto"  # cuda when present, else cpu
    chat_template: str | None = None  # Jinja; None: the tokenizer's, else DEFAULT_CHAT_TEMPLATE
    dtype: str = "auto"  # bf16 on GPUs that have it, fp32 on CPU; or fp32/bf16/fp16
    pack_linears: bool = True  # CPU: weights packed once for oneDNN (lmref.serving.packed_linear)
    slot_cache: bool = True  # Llama models decode over preallocated slots (serving.slot_batch)
    # With the slot cache, an fp32 model on CPU: the decode step's weights in fewer bytes
    # (serving.fused_llama.SmallLinear says what each costs; int8-dynamic changes text; int8
    # is the fastest where serving.matvec's kernel is built).
    decode_weights: DecodeWeights = "same"
    admission: Literal["continuous", "static"] = "continuous"  # static: the baseline (scheduler)
    # A folder is served only when it matches its sha256 manifest (lmref.serving.integrity); True
    # also serves one without a manifest, or a hub id (nothing to verify), with a logged warning.
    allow_unmanifested: bool = False
