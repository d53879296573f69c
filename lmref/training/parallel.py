"""Parallelism plans for the one training loop: DDP, FSDP2, tensor parallel (DTensor), FSDP x TP.

``lmref.training.loop.train`` does not fork per mode: it asks a ``ParallelPlan`` what differs.
A plan answers five questions, and nothing else in the loop knows which mode runs:

- how the model is placed on the ranks (``apply``: DDP wrapper, ``fully_shard``,
  ``parallelize_module``, a pipeline stage);
- how the data is sharded (``data_rank`` / ``data_world``): data-parallel ranks (DDP, FSDP) read
  different shards; tensor-parallel ranks must read the SAME batch (they hold parts of one model);
- how a micro-batch's loss becomes gradients (``forward_backward``, ``sync``, ``finish_gradients``)
  and how gradients are scaled: DDP and FSDP *average* over data ranks, so the loop multiplies
  the token-weighted loss by ``data_world``; TP and PP ranks do not average;
- how sums (tokens, loss) are added up (``sum_over_data``) and the gradient norm is taken
  (``clip_grad_norm``: over DTensor shards without counting a replicated tensor twice);
- how state is saved: a full safetensors file written by rank 0, or a sharded
  ``torch.distributed.checkpoint`` folder written by every rank (``sharded_state``), and the
  full model gathered for the final Hugging Face folder (``full_model``).

Pipeline parallelism (``pp``) is ``lmref.training.pipeline_parallel``'s ``PipelinePlan``, the
same protocol with its own ``forward_backward`` (a pipeline schedule per micro-batch).
The models are Llama-shaped (``model.model.layers[i].self_attn.q_proj`` ...): the course's
presets, SmolLM2 and most Hugging Face decoders.

Usage::

    from lmref.training.parallel import ParallelConfig, make_plan

    with distributed() as env:
        plan = make_plan(ParallelConfig(parallel="fsdp"), model.config)
        model = plan.apply(model)
        train(model, dataset, config, plan=plan)
        full = plan.full_model(model)          # rank 0: a plain HF model to save_pretrained

    # torchrun --standalone --nproc-per-node 2 -m lmref.train --parallel tp --max-steps 20
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lmref.core.device import select_precision
from lmref.core.ranks import rank_and_world

MODES = ("ddp", "fsdp", "tp", "pp", "fsdp+tp")


@dataclass
class ParallelConfig:
    """How ``python -m lmref.train`` spreads the model over the ranks (flags of the same names)."""

    parallel: str = field(
        default="ddp", metadata={"help": "ddp, fsdp, tp, pp or fsdp+tp (world size 1: none)"}
    )
    tensor_parallel_size: int = field(
        default=2,
        metadata={"help": "fsdp+tp: ranks per tensor-parallel group (the mesh's 2nd dim)"},
    )
    # True: ZeRO-3 style, every layer's full weights are freed after its forward and gathered
    # again for the backward (least memory, one more all-gather a layer). False: ZeRO-2 style,
    # they stay gathered from forward to backward (more memory, less communication).
    reshard_after_forward: bool = field(
        default=True, metadata={"help": "fsdp: free gathered weights after forward (ZeRO-3)"}
    )
    cpu_offload: bool = field(
        default=False, metadata={"help": "fsdp: keep sharded weights and optimizer on the CPU"}
    )
    sequence_parallel: bool = field(
        default=False, metadata={"help": "tp: shard the norms' activations along the sequence"}
    )
    pp_schedule: str = field(default="gpipe", metadata={"help": "pp: gpipe or 1f1b"})
    pp_microbatches: int = field(
        default=2, metadata={"help": "pp: pipeline micro-batches a loop micro-batch splits into"}
    )


def check_plan(config: ParallelConfig, world: int, model_config: Any = None) -> None:
    """Raise ``ValueError`` naming the numbers when ``config`` cannot run on ``world`` ranks."""
    if config.parallel not in MODES:
        raise ValueError(f"--parallel must be one of {', '.join(MODES)}, got {config.parallel!r}")
    if config.pp_schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"--pp-schedule must be gpipe or 1f1b, got {config.pp_schedule!r}")
    if config.pp_microbatches < 1:
        raise ValueError(f"--pp-microbatches must be >= 1, got {config.pp_microbatches}")
    tp = tp_degree(config, world)
    if config.parallel == "fsdp+tp" and (tp < 1 or world % tp or world // tp < 2):
        raise ValueError(
            f"--parallel fsdp+tp needs a world size that is a multiple of --tensor-parallel-size "
            f"with at least 2 data-parallel groups; got world size {world}, tensor-parallel size {tp}"
        )
    if model_config is None:
        return
    if tp > 1:
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(model_config, name)
            if value % tp:
                raise ValueError(
                    f"--parallel {config.parallel}: {name}={value} is not divisible by the "
                    f"tensor-parallel size {tp}; each rank must hold whole heads and columns"
                )
    layers = model_config.num_hidden_layers
    if config.parallel == "pp" and world > 1 and layers < world:
        raise ValueError(f"--parallel pp: {layers} layers cannot make {world} pipeline stages")


def tp_degree(config: ParallelConfig, world: int) -> int:
    """Ranks that hold parts of one model copy by tensor parallelism."""
    return {"tp": world, "fsdp+tp": config.tensor_parallel_size}.get(config.parallel, 1)


@dataclass
class ParallelPlan:
    """What the loop asks of a parallelism mode. This base is plain data parallelism: with
    ``data_world`` ranks it is DDP (the model wrapped by ``lmref.training.distributed.wrap_model``),
    with one rank a single process; the loop's behaviour before plans existed."""

    mode: str = "ddp"
    data_rank: int = 0
    data_world: int = 1
    data_group: Any = None  # the process group sums run over; None: the default (whole) group
    sharded_state: bool = False  # checkpoints through torch.distributed.checkpoint, every rank

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from lmref.training.distributed import wrap_model

        return wrap_model(model)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose parameters the optimizer and checkpoints see."""
        from lmref.training.distributed import unwrap_model

        return unwrap_model(model)

    def check_run(self, config, loss_fn: Callable, eval_dataset) -> None:
        """Refuse settings this plan cannot train with, before anything runs."""

    def sync(self, model: torch.nn.Module, last: bool):
        """DDP all-reduces gradients in backward(); on all but the last micro-step that is waste."""
        return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()

    def forward_backward(
        self, model, batch: dict, loss_fn: Callable, step_tokens: torch.Tensor, autocast, scaler
    ) -> torch.Tensor:
        """One micro-batch: backward of ``loss_sum * data_world / step_tokens`` (the step's
        token-weighted loss, a sum over data ranks once they average); returns the loss sum."""
        with autocast:
            loss_sum, _ = loss_fn(model, batch)
        scaler.scale(loss_sum * self.data_world / step_tokens).backward()
        return loss_sum.detach()

    def finish_gradients(self, model: torch.nn.Module) -> None:
        """After the last backward of a step, before clipping (PP: tied weights' gradients)."""

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def sum_over_data(self, value, device: torch.device) -> torch.Tensor:
        """``value`` summed over the ranks that read different data (tokens, loss sums)."""
        tensor = torch.as_tensor(value, device=device)
        if dist.is_available() and dist.is_initialized() and self.data_world > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, group=self.data_group)
        return tensor

    def full_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """A plain model holding the full weights, on rank 0 (None elsewhere); every rank calls it
        (sharded plans gather). Here: the model itself."""
        return self.unwrap(model) if rank_and_world()[0] == 0 else None


@dataclass
class ShardedPlan(ParallelPlan):
    """FSDP2, tensor parallelism or both on a DeviceMesh: parameters become DTensors."""

    config: ParallelConfig = field(default_factory=ParallelConfig)
    mesh: Any = None  # DeviceMesh: 1-D ("dp",) or ("tp",); 2-D ("dp", "tp")
    sharded_state: bool = True

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from lmref.training.distributed import read_env

        model = model.to(read_env().device)
        if "tp" in self.mesh.mesh_dim_names:
            _apply_tensor_parallel(model, self.mesh["tp"], self.config.sequence_parallel)
        if "dp" in self.mesh.mesh_dim_names:
            _apply_fsdp(model, self.mesh["dp"], self.config)
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # fully_shard and parallelize_module change the module in place

    def sync(self, model: torch.nn.Module, last: bool):
        # FSDP2's counterpart of no_sync: no reduce-scatter of gradients until the last micro-step.
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        return nullcontext()

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return clip_sharded_grad_norm(params, max_norm)

    def full_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective: every rank takes part, rank 0 alone keeps the gathered tensors (cpu_offload).
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank_and_world()[0] != 0:
            return None
        return plain_copy(model, full)


def plain_copy(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """A fresh model of ``model``'s Hugging Face class and config holding ``state`` (built on the
    meta device first, so no second random initialisation is paid for)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()  # an assigned embedding no longer is the lm_head's: tie them again
    return plain


def make_plan(config: ParallelConfig, model_config: Any = None) -> ParallelPlan:
    """The plan for ``config`` on this process group (world size 1: a single-process plan)."""
    rank, world = rank_and_world()
    check_plan(config, world, model_config)
    if config.parallel == "ddp" or world == 1:  # one process: nothing to split
        mode = config.parallel if world > 1 else "none"
        return ParallelPlan(mode=mode, data_rank=rank, data_world=world)
    if config.parallel == "pp":
        from lmref.training.pipeline_parallel import PipelinePlan

        return PipelinePlan(mode="pp", config=config, rank=rank, world=world)
    from torch.distributed.device_mesh import init_device_mesh

    from lmref.training.distributed import read_env

    device = read_env().device.type
    if config.parallel == "fsdp":
        mesh = init_device_mesh(device, (world,), mesh_dim_names=("dp",))
    elif config.parallel == "tp":
        mesh = init_device_mesh(device, (world,), mesh_dim_names=("tp",))
    else:
        tp = config.tensor_parallel_size
        mesh = init_device_mesh(device, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    has_dp = "dp" in mesh.mesh_dim_names
    return ShardedPlan(
        mode=config.parallel,
        data_rank=mesh["dp"].get_local_rank() if has_dp else 0,
        data_world=mesh["dp"].size() if has_dp else 1,  # TP ranks all read the same batch
        data_group=mesh["dp"].get_group() if has_dp else None,
        config=config,
        mesh=mesh,
    )


# ---------------------------------------------------------------- applying the plans


def _apply_fsdp(model: torch.nn.Module, mesh, config: ParallelConfig) -> None:
    """FSDP2: ``fully_shard`` each decoder layer (its own all-gather / reduce-scatter unit), then
    the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": mesh, "reshard_after_forward": config.reshard_after_forward}
    if select_precision(mesh.device_type) == "bf16":
        # bf16 compute and communication, fp32 gradient reduction and master weights, where the
        # one precision policy (lmref.core.device) says bf16: on the CPU it says fp32, no policy.
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def _apply_tensor_parallel(model: torch.nn.Module, mesh, sequence_parallel: bool) -> None:
    """Megatron-style: q/k/v and gate/up split by output columns, o_proj and down_proj by input
    rows, so each block needs one all-reduce after attention and one after the MLP.

    Each rank then holds num_attention_heads / tp query heads and num_key_value_heads / tp key and
    value heads. Hugging Face Llama attention (transformers 5.x) reshapes with ``-1`` heads
    (``view(*input_shape, -1, head_dim)``) and repeats key/value heads by the config's ratio,
    which the split keeps, so the config's head counts need no change per rank.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    for layer in model.model.layers:
        plan: dict = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        if sequence_parallel:
            # The norms run on sequence shards; the projections gather them (all-gather) and
            # scatter their results back (reduce-scatter) instead of one all-reduce.
            plan.update(
                {
                    "input_layernorm": SequenceParallel(),
                    "post_attention_layernorm": SequenceParallel(),
                    "self_attn": PrepareModuleInput(
                        input_kwarg_layouts={"hidden_states": Shard(1)},
                        desired_input_kwarg_layouts={"hidden_states": Replicate()},
                    ),
                    "mlp": PrepareModuleInput(
                        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                    ),
                    "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                    "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
                }
            )
        parallelize_module(layer, mesh, plan)
        if sequence_parallel:
            # The embeddings and head stay replicated (the head is tied to them), so each layer
            # takes its own shard of the sequence on entry (a local slice, no communication)
            # and gathers the sequence on exit. Without this the norms read the full sequence
            # as one rank's shard: "The size of tensor a (32) must match the size of tensor b
            # (16) at non-singleton dimension 2" in apply_rotary_pos_emb.
            parallelize_module(
                layer,
                mesh,
                PrepareModuleInputOutput(
                    input_layouts=(Replicate(),),
                    desired_input_layouts=(Shard(1),),
                    use_local_input=True,
                    output_layouts=(Shard(1),),
                    desired_output_layouts=(Replicate(),),
                ),
            )


# ---------------------------------------------------------------- gradient norm


def clip_sharded_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for a mix of DTensor and plain gradients, with the clip coefficient
    computed as torch's (``max_norm / (norm + 1e-6)``, at most 1).

    A shard's squared norm is summed over the mesh dimensions it is sharded on; a replicated or
    plain tensor (a TP model's norms and embeddings, identical on every rank) counts once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    return clip_grads_to_norm(grads, sharded_sq_norm(grads), max_norm)


def sharded_sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    plain = torch.zeros((), dtype=torch.float32)
    by_groups: dict[tuple, torch.Tensor] = {}
    for g in grads:
        if isinstance(g, DTensor):
            # Shard or _StridedShard (FSDP over TP; its is_shard() is False): a part to add up.
            dims = tuple(
                d for d, p in enumerate(g.placements) if not (p.is_replicate() or p.is_partial())
            )
            key = tuple(g.device_mesh.get_group(d) for d in dims)
            local = g.to_local().detach().float().pow(2).sum().cpu()
            by_groups[key] = by_groups.get(key, torch.zeros(())) + local
        else:
            plain += g.detach().float().pow(2).sum().cpu()
    total = plain
    for groups, partial in by_groups.items():  # one all-reduce per mesh dimension and group
        for group in groups:
            dist.all_reduce(partial, group=group)
        total = total + partial
    return total


def clip_grads_to_norm(grads: list[torch.Tensor], sq_norm: torch.Tensor, max_norm: float):
    norm = sq_norm.sqrt()
    if max_norm != math.inf:
        coef = torch.clamp(torch.tensor(max_norm) / (norm + 1e-6), max=1.0).item()
        for g in grads:
            g.mul_(coef)
    return norm
