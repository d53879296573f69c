"""Pipeline parallelism for the training loop: the model split by layers into one stage a rank,
run by ``torch.distributed.pipelining``'s GPipe or 1F1B schedule.

PP goes through ``lmref.training.loop.train`` like every other mode: data, schedule, optimizer,
clipping, logging and checkpoints are the loop's. What differs is this plan's ``forward_backward``:
a loop micro-batch is cut into ``pp_microbatches`` pipeline micro-batches and one schedule step
runs their forwards and backwards over the stages, the loss computed on the last stage. What a
plain forward cannot do under PP, and so this module refuses before a run starts: a custom
``loss_fn`` (the schedule owns the loss: it is the causal-LM loss here) and evaluation (every
rank holds part of the model; ``evaluate_loss`` calls a whole one).

The split is manual (``StageModule``), not ``torch.distributed.pipelining.pipeline``'s tracer:
stage i keeps its share of the decoder layers, the first also the embeddings, the last also the
final norm and the head, under the full model's parameter names, so a stage's checkpoint keys are
the full model's and ``torch.distributed.checkpoint`` reshards between PP and any other mode.
A head tied to the embeddings lives on both end stages; its gradient is summed over them after
each step (``finish_gradients``), as Megatron does with its embedding group, and counts once in
the gradient norm.

Usage::

    plan = make_plan(ParallelConfig(parallel="pp", pp_schedule="1f1b", pp_microbatches=4))
    stage = plan.apply(model)                    # this rank's StageModule
    train(stage, dataset, config, plan=plan)     # lmref.training.loop.train
    full = plan.full_model(stage)                # rank 0: the whole model, weights gathered
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lmref.core.losses import loss_sum_from_logits
from lmref.training.parallel import ParallelConfig, ParallelPlan, clip_grads_to_norm


class StageModule(torch.nn.Module):
    """Layers ``[first, last)`` of a Llama-shaped causal LM, with the embeddings on stage 0 and
    the final norm and head on the last stage; parameters keep the full model's names."""

    def __init__(self, model: torch.nn.Module, stage: int, stages: int) -> None:
        super().__init__()
        layers = len(model.model.layers)
        bounds = [round(i * layers / stages) for i in range(stages + 1)]
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        self.config = model.config
        self.model = torch.nn.Module()  # a container, so names read model.layers.3....
        if self.is_first:
            self.model.embed_tokens = model.model.embed_tokens
        # A ModuleDict keyed "3" names its parameters as ModuleList index 3 does.
        self.model.layers = torch.nn.ModuleDict(
            {str(i): model.model.layers[i] for i in range(bounds[stage], bounds[stage + 1])}
        )
        self.model.rotary_emb = model.model.rotary_emb
        if self.is_last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head
        self.full = [model]  # in a list: not a submodule (its parameters are not all this stage's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.model.embed_tokens(x) if self.is_first else x
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
            position_ids=positions,
        )  # fmt: skip
        rotary = self.model.rotary_emb(hidden, position_ids=positions)
        for layer in self.model.layers.values():
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions
            )
        return self.lm_head(self.model.norm(hidden)) if self.is_last else hidden


@dataclass
class PipelinePlan(ParallelPlan):
    """One stage a rank; every rank reads the same batches (there is no data parallelism)."""

    config: ParallelConfig = field(default_factory=ParallelConfig)
    rank: int = 0
    world: int = 1
    sharded_state: bool = True
    schedule: Any = None
    tied: list = field(default_factory=list)  # parameters on both end stages (a tied head)
    tied_group: Any = None
    _tokens: torch.Tensor | None = None
    _sums: list = field(default_factory=list)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        from lmref.training.distributed import read_env

        device = read_env().device
        stage = StageModule(model.to(device), self.rank, self.world)
        embedding = model.get_input_embeddings().weight
        if model.lm_head.weight is embedding and self.world > 1:
            self.tied = [embedding] if stage.is_first or stage.is_last else []
            # Only the two end stages hold the tied weight: a group of those two adds their
            # gradients. new_group is collective: every rank makes it, stage or not.
            self.tied_group = dist.new_group([0, self.world - 1])
        pipe_stage = PipelineStage(stage, self.rank, self.world, device)
        schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[self.config.pp_schedule]
        # scale_grads=False: the loss is already token-weighted over the whole step (_loss).
        self.schedule = schedule(
            pipe_stage, self.config.pp_microbatches, loss_fn=self._loss, scale_grads=False
        )
        return stage

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def check_run(self, config, loss_fn, eval_dataset) -> None:
        from lmref.core.losses import causal_lm_loss_sum

        if loss_fn is not causal_lm_loss_sum:
            raise ValueError("--parallel pp trains with the causal-LM loss only (the pipeline "
                             "schedule computes the loss on the last stage)")  # fmt: skip
        if eval_dataset is not None:
            raise ValueError("--parallel pp does not evaluate (each rank holds part of the "
                             "model); pass no eval_dataset (--eval-split none)")  # fmt: skip
        if config.per_device_train_batch_size % self.config.pp_microbatches:
            raise ValueError(
                f"--parallel pp: the micro-batch size {config.per_device_train_batch_size} is "
                f"not divisible by --pp-microbatches {self.config.pp_microbatches}"
            )

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss_sum, _ = loss_sum_from_logits(logits, {"input_ids": target})
        self._sums.append(loss_sum.detach())
        return loss_sum / self._tokens  # the step's token-weighted loss (one data rank)

    def forward_backward(self, model, batch, loss_fn, step_tokens, autocast, scaler):
        ids = batch["input_ids"]
        self._tokens, self._sums = step_tokens, []
        with autocast:
            if model.is_first:
                self.schedule.step(ids, target=ids)
            else:
                self.schedule.step(target=ids)
        loss_sum = (
            torch.stack(self._sums).sum() if self._sums else torch.zeros((), device=ids.device)
        )
        dist.all_reduce(loss_sum)  # the last stage's loss, on every rank (the others add 0)
        return loss_sum

    def finish_gradients(self, model: torch.nn.Module) -> None:
        if not self.tied:
            return
        for p in self.tied:
            dist.all_reduce(p.grad, group=self.tied_group)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        counted = [p.grad for p in params if p.grad is not None and not self._counted_elsewhere(p)]
        sq = sum((g.detach().float().pow(2).sum() for g in counted), torch.zeros(()))
        dist.all_reduce(sq)  # stages hold disjoint parameters: their squares add up
        return clip_grads_to_norm(grads, sq, max_norm)

    def _counted_elsewhere(self, p: torch.nn.Parameter) -> bool:
        return self.rank != 0 and any(p is t for t in self.tied)  # stage 0 counts the tied one

    def sum_over_data(self, value, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(value, device=device)  # one data shard: nothing to add

    def full_model(self, model: StageModule) -> torch.nn.Module | None:
        """Every stage's parameters gathered on rank 0 into the whole model (small models: this
        goes through pickled objects; a large one would be resharded from the DCP checkpoint)."""
        mine = {n: p.detach().cpu() for n, p in model.named_parameters()}
        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine)
        if self.rank != 0:
            return None
        full = model.full[0]
        state = {k: v for part in parts for k, v in part.items()}
        full.load_state_dict(state, strict=False)
        return full
