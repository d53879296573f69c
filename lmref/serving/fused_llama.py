"""A Llama decode step in few, large calls: the weights the engine's slot cache reads per token.

The decode step of a small model on a CPU is bound by reading its weights (every token reads
each once) and, past that, by the number of calls (each costs microseconds of dispatch, whatever
its size): transformers' Llama layer makes 7 matmuls and dozens of small calls per token.
``FusedLlama`` takes the weights of a loaded ``LlamaForCausalLM`` once and keeps them so that a
layer is 4 matmuls and 13 other computing calls (views aside):

- q, k and v stacked into one matrix, gate and up into another (larger matmuls read memory
  closer to its bandwidth: on a 2-core AMD EPYC one 960x576 fp32 matvec took 111 us, the three
  it replaces 182 us);
- each packed once for oneDNN (``lmref.serving.packed_linear``), in the layout that measured
  fastest on this kind of CPU (``largest_matrices_layout``), with the residual additions done
  by the o and down matmuls as they write (oneDNN's "sum" post-op: two calls fewer a layer);
  in fp32 up to 8 rows go through ``lmref.serving.matvec``'s kernel instead, which streams the
  weights faster (it keeps a plain copy of them for that), and int8 weights always do;
- ``torch.rms_norm`` (one call, not seven), rotary embedding of q and k together in three
  calls, the softmax scale folded into the mask's addition;
- on a CPU where ``lmref.serving.matvec``'s kernel is built, with fp32 activations, fewer still:
  each norm inside the matmul after it, the rotary and cache writes in one call, and for up to
  8 rows the attention in one: 8 calls a layer (4 matmuls, the rotary, the attention, SiLU and
  a multiply): a one-row step of SmolLM2-135M with int8 weights took 3.4 ms (AVX-512 EPYC).

It is a copy: the model keeps its own (packed) weights for prefill, which runs its forward
(chunks, prefix cache, prompt scoring). For SmolLM2-135M the copy is 106 M of 135 M
parameters (qkv, gate/up, o, down and the output layer; the rest is shared).

Usage (``lmref.serving.slot_batch`` owns the cache; the loader builds this before packing)::

    fused = FusedLlama.of(model)          # None: not a plain Llama model
    tables = fused.rotary_tables(columns, values[0, 0, 0])   # once per cache size
    logits = fused.decode(tokens, positions, keys, values, tables, width)   # a token per row
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from lmref.serving.matvec import FewRowsLinear, Int8Linear, matvec_kernel
from lmref.serving.packed_linear import PackedLinear, packing_available
from lmref.serving.spec import DecodeWeights

DECODE_WEIGHTS = get_args(DecodeWeights)


class SmallLinear:
    """``x @ W.T`` with ``W`` stored in fewer bytes (an fp32 model on an x86 CPU). Measured on
    SmolLM2-135M in ``benchmarks/results/decode_weights-cpu-avx2.json`` (and ``-avx512``):

    - ``"fp16"`` (FBGEMM, the kernels behind ``torch.ops.quantized``): weights rounded to fp16
      and widened as read, arithmetic in fp32: a row's result does not depend on its batch;
    - ``"int8"``: int8 per output channel (scale = max |w| / 127). Where
      ``lmref.serving.matvec``'s kernel is built (``_linear`` then makes an ``Int8Linear``,
      not this), each row of activations is rounded to int16 with its own scale and the
      products summed exactly: fast at every batch, and a row's result does not depend on its
      batch. Without it (this class), torch's ``_weight_int8pack_mm`` (the kernel of torchao's
      int8 weight-only CPU path) with fp32 activations, fast for bf16 inputs only: a 3072x576
      matvec took 572 us, 9x the bf16 one, and 16 rows took 41x (9.7 ms against 0.24; AVX-512
      EPYC; with torch's AVX2 kernels there, 595 us against 105 at one row);
    - ``"int8-bf16"``: the same int8 weights and kernel, fed bf16 activations; it returns bf16
      (the decode step's additions widen it back into its fp32 residual stream). Its scales
      are bf16 too, so the weights are rounded against the scale the kernel reads. The kernel
      gives a row the same bits alone or in a batch, but activations rounded to bf16 turn the
      fp32 rest's tiny batch differences into different text (1 of 4 prompts kept its greedy
      text alone and among 15 others, 3 of 4 in a later run; fp32 4 of 4 in both);
    - ``"int8-dynamic"`` (FBGEMM): the same int8 weights, and activations quantized at each
      call to 7 bits (``reduce_range``: AVX2's 16-bit pairwise sums cannot saturate) with ONE
      scale for the whole input: outlier channels cost accuracy, and a row's result depends on
      the other rows in the batch (its greedy text can change with the load).

    torch.ao's Python API around FBGEMM's ops is deprecated (torchao replaces it); the ops
    themselves are what ``torch.ao.nn.quantized.dynamic.Linear`` calls.
    """

    def __init__(self, weight: torch.Tensor, kind: str):
        weight = weight.detach().float().contiguous()
        scale = (weight.abs().amax(1) / 127).clamp(min=1e-12)
        if kind == "fp16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
            self.run = torch.ops.quantized.linear_dynamic_fp16
        elif kind in ("int8", "int8-bf16"):
            if kind == "int8-bf16":
                scale = scale.bfloat16()  # rounded first: the weights are rounded against it
            int8 = (weight / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.packed = (int8, scale)
            if kind == "int8":
                self.run = lambda x, p: torch.ops.aten._weight_int8pack_mm(x, *p)
            else:
                self.run = lambda x, p: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), *p)
        else:
            zero = torch.zeros(weight.shape[0], dtype=torch.long)
            quantized = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
            self.run = lambda x, p: torch.ops.quantized.linear_dynamic(x, p, True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.packed)


def output_layer_weights(weights: str) -> str:
    """How the output layer is stored under decode weights ``weights``: as they say, except
    int8-bf16's, which is fp16 (``FusedLlama.__init__`` says why)."""
    return "fp16" if weights == "int8-bf16" else weights


def largest_matrices_layout() -> int:
    """The batch-size hint the largest matrices (qkv, gate/up, the output layer) are packed
    with: oneDNN's layout for one row or its layout for 16 (the rest always take 16's). Which
    reads faster depends on the CPU (SmolLM2-135M, fp32, 2 threads):

    - AVX2 only (an AMD EPYC): the one-row layout read the weights 18-21% faster for one row
      and 5-10% slower for 16-64 rows; decode of a few streams is bound by these reads, of many
      by arithmetic, where 5% of the matmuls matters less: 1 there;
    - AVX-512 (an AMD EPYC with VNNI and BF16): the layout for 16 was faster at every batch,
      ``slot_batch`` steps interleaved in one process, three runs: 4-15% at one row, 12-25% at
      16, 8-16% at 64: 16 there, and on the Intel Xeon too until it is measured (it has
      AVX-512; AMX does not do fp32).

    Where fp32 steps of up to 8 rows go through ``lmref.serving.matvec``'s kernel, oneDNN's
    layout only serves more rows, and ``FewRowsLinear`` takes 16's on every CPU (inferred from
    the AVX2 numbers above, not measured with the kernel there).
    """
    return 1 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 16


def _linear(weight: torch.Tensor, batch_hint: int, weights: str = "same"):
    """A callable ``x -> x @ weight.T``: smaller weights when asked (int8 through
    ``lmref.serving.matvec``'s kernel where it is built, else ``SmallLinear``), else
    oneDNN-packed where it can be (fp32: up to 8 rows through ``lmref.serving.matvec``'s kernel
    where it is built), else ``F.linear``."""
    if weights == "int8" and weight.device.type == "cpu" and (kernel := matvec_kernel()):
        return Int8Linear(weight, kernel)
    if weights != "same":
        return SmallLinear(weight, weights)
    if weight.device.type == "cpu" and packing_available(weight.dtype):
        kernel = matvec_kernel() if weight.dtype == torch.float32 else None
        if kernel is not None:
            return FewRowsLinear(weight, kernel)
        return PackedLinear(weight, None, batch_hint)
    weight = weight.detach()  # o, down, lm_head: the model's own tensor, no copy
    return lambda x: F.linear(x, weight)


def _add_linear(residual: torch.Tensor, linear, x: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``: one call when ``linear`` is oneDNN-packed or the kernel's."""
    if isinstance(linear, (PackedLinear, FewRowsLinear, Int8Linear)):
        return linear.add_to(residual, x)
    return residual + linear(x)


def _normed_linear(linear, x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """``linear(torch.rms_norm(x, ..., gain, eps))``: one call when ``linear`` is the kernel's."""
    if isinstance(linear, (FewRowsLinear, Int8Linear)):
        return linear.after_norm(x, gain, eps)
    return linear(torch.rms_norm(x, (x.shape[-1],), gain, eps))


def llama_layers(model):
    """The decoder layers of a plain Llama-architecture CausalLM (no adapters, no biases,
    SiLU), else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return None
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return None
    if getattr(config, "hidden_act", "") != "silu" or getattr(model, "peft_config", None):
        return None
    return getattr(getattr(model, "model", None), "layers", None)


@dataclass
class _Layer:
    qkv: object
    o: object
    gate_up: object
    down: object
    norm_attention: torch.Tensor
    norm_mlp: torch.Tensor


class FusedLlama:
    """The decode-time weights of one Llama model, and its decode step over a KV cache."""

    def __init__(self, model, weights: str = "same"):
        config = model.config
        self.model = model  # its embedding and rotary embedding are shared
        self.kv_heads = config.num_key_value_heads
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden, self.eps = config.hidden_size, config.rms_norm_eps
        self.intermediate = config.intermediate_size
        self.scale = self.head_dim**-0.5
        self.layers = []
        largest = largest_matrices_layout()
        for layer in llama_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.layers.append(
                _Layer(
                    _linear(qkv, largest, weights),
                    _linear(attn.o_proj.weight, 16, weights),
                    _linear(gate_up, largest, weights),
                    _linear(mlp.down_proj.weight, 16, weights),
                    layer.input_layernorm.weight.detach(),
                    layer.post_attention_layernorm.weight.detach(),
                )
            )
        self.norm = model.model.norm.weight.detach()
        # int8-bf16's output layer reads fp16 weights and writes fp32 logits. In int8-bf16 it
        # would write bf16 ones (8 significant bits: a logit near 20 rounded to a multiple of
        # 0.125), and held-out perplexity rose +0.51% that way against +0.29% this way
        # (SmolLM2-135M, AVX-512 EPYC), for 28 MB read instead of 56 (113 in fp32).
        self.lm_head = _linear(model.lm_head.weight, largest, output_layer_weights(weights))
        self.kernel = matvec_kernel()  # its rotary, cache writes and attention; None: torch

    @classmethod
    def of(cls, model, weights: str = "same") -> FusedLlama | None:
        """Fused weights for ``model`` when it is a plain Llama whose linears are still
        ``nn.Linear`` (before ``pack_linears``), else None (the engine then runs its forward).
        ``weights``: "same" (the model's dtype), or one of ``SmallLinear``'s (CPU, fp32)."""
        layers = llama_layers(model)
        if not layers or type(layers[0].self_attn.q_proj) is not torch.nn.Linear:
            return None
        if weights not in DECODE_WEIGHTS:
            raise ValueError(f"decode weights {weights!r}: expected one of {DECODE_WEIGHTS}")
        if weights != "same" and (model.device.type != "cpu" or model.dtype != torch.float32):
            raise ValueError(f"decode weights {weights!r} need an fp32 model on CPU")
        return cls(model, weights)

    def rotary_tables(self, columns: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) for positions 0..columns-1, from the model's own rotary embedding
        (any rope scaling it has): x * cos + roll(x, d/2) * signed_sin is transformers'
        ``x * cos + rotate_half(x) * sin``."""
        positions = torch.arange(columns, device=like.device).unsqueeze(0)
        cos, sin = self.model.model.rotary_emb(like, positions)
        cos, sin = cos[0].to(like.dtype), sin[0].to(like.dtype)
        half = self.head_dim // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], -1)

    @torch.inference_mode()
    def decode(
        self,
        tokens: torch.Tensor,  # (rows,) one new token per row
        positions: torch.Tensor,  # (rows,) its position: the row's tokens so far
        keys: torch.Tensor,  # (layers, slots, kv_heads, head_dim, columns): transposed, below
        values: torch.Tensor,  # (layers, slots, kv_heads, columns, head_dim); rows 0..n-1 used
        tables: tuple[torch.Tensor, torch.Tensor],  # rotary_tables(columns)
        width: int,  # columns to attend over: max(positions) + 1
    ) -> torch.Tensor:
        """Write each row's new key and value at its position and return its next-token
        logits (rows, vocab).

        Keys are stored transposed, a (head_dim, columns) matrix per row and head, so the
        scores are ``q @ keys`` on them as they lie. In the values' (columns, head_dim) layout
        ``q @ keys.T`` is a strided batch of small matmuls that torch's CPU bmm runs slower: at
        64 rows over 100 of 256 columns, 10.9 ms a step (30 layers) against 7.1. The whole step
        against that layout (2-core AMD EPYC with AVX-512, interleaved): the same over 30-50
        columns, 2-8% faster at 16 and 64 rows over 60-500 columns."""
        n, kv, d, half = tokens.shape[0], self.kv_heads, self.head_dim, self.head_dim // 2
        heads, groups = self.heads, self.heads // self.kv_heads
        rows = torch.arange(n, device=tokens.device)
        cos, sin = tables[0][positions], tables[1][positions]  # (n, d): each row's position
        # The kernel's rotary and cache writes where it is built and the cache is CPU fp32 (one
        # call for five), and its attention (one call for four; at 64 rows over 300 columns
        # 0.76 against torch's 0.81 ms a layer, at 8 rows 0.06 against 0.09: Intel Xeon). Else
        # torch's calls, with one mask for all layers: a row attends to its own columns up to
        # its new token.
        kernel = self.kernel if keys.is_cpu and keys.dtype == torch.float32 else None
        if kernel is None:
            bias = torch.zeros((n, 1, 1, width), dtype=keys.dtype, device=keys.device)
            columns = torch.arange(width, device=keys.device)
            bias.masked_fill_(columns > positions.view(n, 1, 1, 1), float("-inf"))
        x = self.model.model.embed_tokens(tokens)
        for i, w in enumerate(self.layers):
            qkv = _normed_linear(w.qkv, x, w.norm_attention, self.eps).view(n, heads + 2 * kv, d)
            if kernel is not None and qkv.dtype == torch.float32:  # int8-bf16's is bf16
                q = kernel.rope_store(qkv.contiguous(), cos, sin, keys, values, i, positions)
            else:
                qk = qkv[:, : heads + kv]  # rotary, q and k at once:
                qk = torch.addcmul(qk * cos[:, None], qk.roll(half, -1), sin[:, None])
                keys[i, rows, :, :, positions] = qk[:, heads:]
                values[i, rows, :, positions] = qkv[:, heads + kv :].to(values.dtype)
                q = qk[:, :heads]
            if kernel is not None:
                out = kernel.attend(q.contiguous(), keys, values, i, positions, self.scale)
            else:
                q = q.view(n, kv, groups, d)  # grouped heads read their shared keys
                scores = q @ keys[i, :n, :, :, :width]  # (n, kv, groups, width)
                weights = torch.softmax(torch.add(bias, scores, alpha=self.scale), dim=-1)
                out = (weights @ values[i, :n, :, :width]).reshape(n, heads * d)
            x = _add_linear(x, w.o, out)
            gate_up = _normed_linear(w.gate_up, x, w.norm_mlp, self.eps)
            act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
            x = _add_linear(x, w.down, act)
        return _normed_linear(self.lm_head, x, self.norm, self.eps)
