"""What data, sharded and tensor parallelism cost on paper: bytes a rank holds for parameters,
gradients and AdamW state, bytes it sends per collective per step, and the pipeline bubble.

Memory. Training with AdamW costs 16 bytes a parameter however the precision is split: fp32
training holds a 4-byte weight, a 4-byte gradient and two 4-byte moments (4 + 4 + 8); mixed
precision (the ZeRO paper's accounting) holds bf16 weights and gradients plus an fp32 master
copy and two fp32 moments (2 + 2 + 12). The schemes divide those bytes among W ranks:

============  ==========  ==========  ===========
scheme        parameters  gradients   optimizer
============  ==========  ==========  ===========
DDP           full        full        full
ZeRO-1        full        full        / W
ZeRO-2        full        / W         / W
ZeRO-3/FSDP2  / W         / W         / W
TP            sharded matrices / W; norms and embeddings (as the plan leaves them) full
============  ==========  ==========  ===========

Activations, temporary buffers and the allocator's slack come on top and are not modelled.

Communication, bytes this rank *sends* per step with ring algorithms (``launch.ring_allreduce_bytes``
is the all-reduce): an all-reduce of S bytes sends 2 (W-1)/W S, an all-gather whose output is
S bytes sends (W-1)/W S, a reduce-scatter whose input is S bytes sends (W-1)/W S. DDP all-reduces
every gradient once; FSDP2 all-gathers the parameters in forward and, when it reshards after
forward, again in backward (not the root module's, which it keeps for the backward that follows
at once, unless told to), and reduce-scatters the gradients. Megatron TP all-reduces the
b x s x h activations twice a block forward (after the row-parallel o_proj and down_proj). Backward,
Megatron's paper counts two more (one input gradient an attention, one an MLP, summed before the
all-reduce); ``parallelize_module``'s per-module plan (``lmref.training.parallel``) makes five,
measured (``lmref.lab.parallel_probe``): each column-parallel projection (q, k, v, gate, up)
all-reduces its own input gradient, ``tp_traffic(..., backward_per_block=5)``.

Usage::

    from lmref.training.parallel_costs import MIXED, bubble_fraction, memory_per_rank, fsdp_traffic

    memory_per_rank("zero3", 7e9, world=8, precision=MIXED).total / 1e9    # 14.0 GB
    [c.wire_bytes for c in fsdp_traffic(1_000_000, world=8)]                # gathers, scatter
    bubble_fraction(stages=4, microbatches=16)                              # 3 / 19
"""

from __future__ import annotations

from dataclasses import dataclass

from lmref.training.launch import ring_allreduce_bytes

SCHEMES = ("ddp", "zero1", "zero2", "zero3", "tp")
ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, BROADCAST = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "broadcast",
)


@dataclass(frozen=True)
class Precision:
    """Bytes a parameter costs in each of the three places training keeps it."""

    name: str
    param: int  # the weights the forward reads
    grad: int
    optimizer: int  # AdamW's two moments, plus the fp32 master weights under mixed precision

    @property
    def total(self) -> int:
        return self.param + self.grad + self.optimizer


FP32 = Precision("fp32", 4, 4, 8)  # weight, gradient, exp_avg + exp_avg_sq
MIXED = Precision("bf16 mixed", 2, 2, 12)  # bf16 weight and gradient; fp32 master, m, v


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds (or, from ``parallel_measure.held_bytes``, was measured to hold)."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def memory_per_rank(
    scheme: str,
    num_params: float,
    world: int,
    precision: Precision = FP32,
    replicated: float = 0,
) -> RankMemory:
    """Bytes of parameters, gradients and optimizer state on one of ``world`` ranks.

    ``replicated`` matters for ``tp`` only: the parameters the plan does not shard (embeddings,
    norms, a head left whole), which every rank holds, with their gradients and state, in full.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= replicated <= num_params:
        raise ValueError(f"replicated={replicated} is outside 0..num_params={num_params}")
    p = num_params
    full, sharded = (lambda b: b * p), (lambda b: b * p / world)
    if scheme == "ddp":
        return RankMemory(full(precision.param), full(precision.grad), full(precision.optimizer))
    if scheme == "zero1":
        return RankMemory(full(precision.param), full(precision.grad), sharded(precision.optimizer))
    if scheme == "zero2":
        return RankMemory(
            full(precision.param), sharded(precision.grad), sharded(precision.optimizer)
        )
    if scheme == "zero3":
        return RankMemory(
            sharded(precision.param), sharded(precision.grad), sharded(precision.optimizer)
        )
    if scheme == "tp":
        share = replicated + (p - replicated) / world
        return RankMemory(
            share * precision.param, share * precision.grad, share * precision.optimizer
        )
    raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")


# ---------------------------------------------------------------- communication


@dataclass(frozen=True)
class Collective:
    """One kind of collective in one phase of a step, on one rank."""

    kind: str  # ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, BROADCAST
    phase: str  # "forward", "backward" or "step"
    calls: int
    payload_bytes: float  # summed over calls: all-reduce buffer, all-gather output, r-s input
    wire_bytes: float  # what this rank sends with a ring algorithm


def ring_send_bytes(kind: str, payload_bytes: float, world: int) -> float:
    """Bytes a rank sends for one collective over ``payload_bytes`` (see the module docstring).

    A broadcast counts as its root's share of an all-gather: (W-1)/W of the payload a rank, on
    average, when every rank broadcasts what it owns (ZeroRedundancyOptimizer's step).
    """
    if kind == ALL_REDUCE:
        return ring_allreduce_bytes(payload_bytes, world, 1)
    if kind in (ALL_GATHER, REDUCE_SCATTER, BROADCAST):
        return (world - 1) / world * payload_bytes
    raise ValueError(f"unknown collective {kind!r}")


def _collective(kind: str, phase: str, calls: int, payload: float, world: int) -> Collective:
    return Collective(kind, phase, calls, payload, ring_send_bytes(kind, payload, world))


def ddp_traffic(num_params: int, world: int, grad_bytes: int = 4, buckets: int = 1) -> list:
    """DDP: every gradient all-reduced once a step, in ``buckets`` buckets (~25 MB each)."""
    return [_collective(ALL_REDUCE, "backward", buckets, num_params * grad_bytes, world)]


def zero1_traffic(
    num_params: int, world: int, grad_bytes: int = 4, param_bytes: int = 4, broadcasts: int = 1
) -> list:
    """``ZeroRedundancyOptimizer`` under DDP: DDP's all-reduce, then each owner broadcasts the
    parameters it updated, an all-gather of the parameters in disguise. (The ZeRO paper's
    ZeRO-1 reduce-scatters instead of all-reducing: 2 (W-1)/W P in all, DDP's volume.) Every
    rank takes part in every broadcast; the wire bytes are the average rank's, since what a rank
    sends depends on which parameters it owns."""
    return ddp_traffic(num_params, world, grad_bytes) + [
        _collective(BROADCAST, "step", broadcasts, num_params * param_bytes, world)
    ]


def fsdp_traffic(
    num_params: int,
    world: int,
    reshard_after_forward: bool = True,
    kept_params: int = 0,
    units: int = 1,
    kept_units: int = 0,
    param_bytes: int = 4,
    grad_bytes: int = 4,
) -> list:
    """FSDP2 (ZeRO-3): all-gather in forward, again in backward when resharding after forward,
    reduce-scatter of the gradients. ``units``: ``fully_shard`` calls (one collective each).
    ``kept_params`` (in ``kept_units``): parameters whose unit keeps its gathered weights after
    forward anyway, which the backward need not gather again: torch 2.13 does that for the root
    unit when ``reshard_after_forward`` is left at its default (None), since the backward needs
    the root's weights at once; passing True to the root reshards it too (measured).
    Payloads are unpadded: each shard is padded to equal size, so measured payloads are larger
    by up to W-1 rows a parameter whose first dimension W does not divide."""
    gathered_again = num_params - kept_params if reshard_after_forward else 0
    out = [_collective(ALL_GATHER, "forward", units, num_params * param_bytes, world)]
    if gathered_again:
        out.append(
            _collective(
                ALL_GATHER, "backward", units - kept_units, gathered_again * param_bytes, world
            )
        )
    out.append(_collective(REDUCE_SCATTER, "backward", units, num_params * grad_bytes, world))
    return out


def tp_traffic(
    batch: int,
    seq: int,
    hidden: int,
    layers: int,
    world: int,
    activation_bytes: int = 4,
    forward_per_block: int = 2,
    backward_per_block: int = 2,
) -> list:
    """Megatron TP: all-reduces of b x s x h activations, ``forward_per_block`` a block forward
    (after the row-parallel o_proj and down_proj) and ``backward_per_block`` backward (of the
    input gradient where the column-parallel projections read a replicated input: Megatron's f
    operator, one an attention and one an MLP). A per-module DTensor plan all-reduces each
    column-parallel linear's input gradient separately unless autograd sums them first: pass the
    count the plan makes."""
    size = batch * seq * hidden * activation_bytes
    return [
        _collective(ALL_REDUCE, phase, n * layers, n * layers * size, world)
        for phase, n in (("forward", forward_per_block), ("backward", backward_per_block))
    ]


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe's idle share of a step with equal stages: (p-1)/(m+p-1). Each stage works m slots
    of the m+p-1 it takes the first micro-batch to enter and the last to leave the pipeline."""
    if stages < 1 or microbatches < 1:
        raise ValueError(f"stages and microbatches must be >= 1, got {stages}, {microbatches}")
    return (stages - 1) / (microbatches + stages - 1)


# ---------------------------------------------------------------- the worked example


def training_memory_table(
    sizes: dict[str, float] | None = None,
    world: int = 8,
    gpu_gb: float = 80.0,
    precision: Precision = MIXED,
) -> list[dict]:
    """One row per model size and scheme: GB a rank holds for weights, gradients and AdamW state
    (activations excluded) and whether it fits a ``gpu_gb`` GPU. TP here shards every parameter
    (a real plan leaves norms and embeddings whole, a few percent more)."""
    sizes = sizes or {"7B": 7e9, "70B": 70e9}
    rows = []
    for name, params in sizes.items():
        for scheme in SCHEMES:
            memory = memory_per_rank(scheme, params, world, precision)
            rows.append(
                {
                    "model": name,
                    "scheme": scheme,
                    "world": world,
                    "params_gb": memory.params / 1e9,
                    "grads_gb": memory.grads / 1e9,
                    "optimizer_gb": memory.optimizer / 1e9,
                    "total_gb": memory.total / 1e9,
                    "fits": memory.total < gpu_gb * 1e9,
                }
            )
    return rows


# ---------------------------------------------------------------- a 3D plan on paper


def plan_3d(
    num_params: float,
    layers: int,
    hidden: int,
    seq: int,
    data: int,
    tensor: int,
    pipeline: int,
    microbatches: int,
    micro_batch: int = 1,
    precision: Precision = MIXED,
) -> dict:
    """A data x tensor x pipeline plan on paper: GB a GPU holds and bytes it sends a step.

    Weights, gradients and AdamW state are split over ``tensor`` x ``pipeline`` GPUs, the
    optimizer state also over ``data`` (ZeRO-1, Megatron's distributed optimizer). Activations:
    the layer inputs kept under full recomputation, bf16, for the ``pipeline`` micro-batches 1F1B
    keeps in flight on the first stage. Traffic a step, per GPU, ring formulas: TP all-reduces of
    micro_batch x seq x hidden bf16 activations, four a layer (Megatron's two forward and two
    backward) for each micro-batch on this stage's layers; PP sends one activation forward and
    one gradient back a micro-batch; DP all-reduces the GPU's bf16 gradients once a step."""
    shard = num_params / (tensor * pipeline)
    activation = micro_batch * seq * hidden * 2
    stage_layers = layers / pipeline
    tp_bytes = 4 * stage_layers * microbatches * ring_send_bytes(ALL_REDUCE, activation, tensor)
    return {
        "gpus": data * tensor * pipeline,
        "data": data,
        "tensor": tensor,
        "pipeline": pipeline,
        "states_gb": shard * (precision.param + precision.grad + precision.optimizer / data) / 1e9,
        "activations_gb": stage_layers * activation * min(pipeline, microbatches) / 1e9,
        "tp_gb": tp_bytes / 1e9,
        "pp_gb": (2 * microbatches * activation if pipeline > 1 else 0) / 1e9,
        "dp_gb": ring_send_bytes(ALL_REDUCE, shard * 2, data) / 1e9,
        "bubble": bubble_fraction(pipeline, microbatches),
        "tokens": data * microbatches * micro_batch * seq,
    }
