"""The serving side of model loading: one served model's weights, tokenizer and facts.

The loading itself is ``lmref.models.loading`` (the project's one loader: names, device and
dtype policy, safetensors only); this adds what a server needs once the model is in memory: the
weights packed for oneDNN on CPU (``lmref.serving.packed_linear``), the context length, the
EOS and pad ids, and the token spellings logprobs report. Loads run one at a time (a lock):
``from_pretrained`` switches process-wide init state (the meta device), so two threads loading
at once corrupt each other's model, and transformers' lazy imports are not thread-safe either.
``load_spec`` is what the engine calls: a ``ModelSpec``'s folder, verified against its sha256
manifest first (``lmref.serving.integrity``: refused, naming the file, when it does not match).

Usage::

    from lmref.serving.loader import load_served_model, load_spec

    served = load_served_model("artifacts/base", device="auto", dtype="auto", pack=True)
    served.model, served.tokenizer, served.context_length, served.eos_ids
    served = load_spec(ModelSpec("base", "artifacts/base"))   # IntegrityError unless verified
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from lmref.models.loading import load_model, load_tokenizer
from lmref.serving.fused_llama import FusedLlama
from lmref.serving.integrity import check_model
from lmref.serving.packed_linear import pack_linears
from lmref.serving.sampler import TokenPieces
from lmref.serving.spec import ModelSpec

_LOAD_LOCK = threading.Lock()
log = logging.getLogger("lmref.serving.loader")


@dataclass
class ServedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer
    device: torch.device
    context_length: int  # prompt + completion tokens the model takes
    eos_ids: frozenset[int]  # any of them ends a row (unless ignore_eos)
    pad_id: int  # fills the left padding of a prefill group (masked)
    pieces: TokenPieces  # token id -> (text, bytes), for logprobs
    fused: FusedLlama | None = None  # a Llama's decode weights (lmref.serving.fused_llama)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings


def load_served_model(
    path: str,
    device: str = "auto",
    dtype: str = "auto",
    pack: bool = True,
    fuse: bool = True,
    decode_weights: str = "same",
) -> ServedModel:
    """Load ``path`` (a folder, hub id or course name) for serving, in eval mode. ``fuse``: a
    Llama model also gets the fused decode weights of ``lmref.serving.slot_batch``, in
    ``decode_weights`` (``lmref.serving.spec.DecodeWeights``: ``fused_llama.SmallLinear``)."""
    with _LOAD_LOCK:
        model = load_model(path, dtype=dtype, device=device)
        fused = (
            FusedLlama.of(model, decode_weights) if fuse else None
        )  # before packing: it reads nn.Linear
        if pack and not getattr(model, "peft_config", None):  # an unmerged adapter stays as is
            pack_linears(model)
        tokenizer = load_tokenizer(path)
    cfg = model.config.get_text_config(decoder=True)
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
    eos = (
        tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    )
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos]) - {None}
    pad = tokenizer.pad_token_id
    return ServedModel(
        model=model,
        tokenizer=tokenizer,
        device=next(model.parameters()).device,
        context_length=int(context),
        eos_ids=eos_ids,
        pad_id=pad if pad is not None else next(iter(eos_ids), 0),
        pieces=TokenPieces(tokenizer),
        fused=fused,
    )


def load_spec(spec: ModelSpec) -> ServedModel:
    """Load what ``spec`` names for serving, once its folder matches its sha256 manifest:
    ``IntegrityError`` (naming the file) otherwise, or when it has none and
    ``spec.allow_unmanifested`` is False; with it, served with a warning in the log."""
    # Both resolve a course name to its folder (lmref.models.loading.resolve_model).
    for warning in check_model(spec.path, spec.allow_unmanifested):
        log.warning("model %s: %s", spec.name, warning)
    return load_served_model(
        spec.path, spec.device, spec.dtype, spec.pack_linears, spec.slot_cache, spec.decode_weights
    )
