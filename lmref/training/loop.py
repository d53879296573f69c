"""One training loop for causal language models: pretraining, full fine-tuning, LoRA, DDP.

No Trainer class owns the run: ``train()`` is a plain function whose loop reads top to bottom
(see the ``while`` loop below). It handles what production runs need:

- AdamW with decay / no-decay groups (fused on CUDA), warmup + cosine schedule (transformers');
- bf16 autocast where supported, fp16 with a gradient scaler where not, fp32 on CPU (the
  policy lives in ``lmref.core.device``, shared by every module that picks a dtype);
- gradient accumulation with a loss weighted by tokens across micro-batches and ranks, so
  4 micro-batches of b equal one batch of 4b; clipping with the norm logged;
- optional ``torch.compile`` and gradient checkpointing;
- periodic evaluation, best model by validation loss, metrics to JSONL, a tqdm bar;
- atomic checkpoints (safetensors weights + optimizer, scheduler, RNG and data position) that
  resume to the same weights as an uninterrupted run (bitwise on CPU); each ends with a
  ``manifest.json`` (sizes and sha256 of its files, written last), and a resume takes the newest
  checkpoint that verifies, warning about the ones it skipped;
- the run's settings saved with each checkpoint: a resume with different settings stops and
  lists them, unless ``allow_config_change`` (see ``check_config_change``);
- settings checked before anything runs (``TrainingConfig.validate``), errors naming the field;
- DistributedDataParallel when the model comes wrapped in it: per-rank data shards, no
  all-reduce on accumulation micro-steps, rank 0 alone writes files;
- FSDP2, tensor, pipeline and FSDP x TP parallelism through a ``ParallelPlan``
  (``lmref.training.parallel``): the plan says how data is sharded, how a micro-batch's loss
  becomes gradients, how sums and the gradient norm are reduced and how state is saved
  (sharded checkpoints through ``torch.distributed.checkpoint``); the loop itself does not fork.

Only parameters with ``requires_grad`` are trained and checkpointed, so a peft LoRA model goes
through the same loop. The loss, its token count and the evaluation loss are
``lmref.core.losses``'s; peak memory is ``lmref.core.memory.PeakMemory``'s; rank and world are
``lmref.core.ranks``'s. Around the loop, in this package: the settings (``config``), start or
resume (``resume``), checkpoint folders (``checkpoints``) and ``metrics.jsonl`` (``metrics_log``).

Usage::

    from lmref.training.loop import TrainingConfig, train

    config = TrainingConfig(output_dir="artifacts/run", max_steps=200, learning_rate=3e-3,
                            per_device_train_batch_size=16, eval_steps=50, save_steps=50)
    result = train(model, corpus["train"], config, eval_dataset=corpus["validation"])
    print(result.best_eval_loss, result.tokens_per_second)
    # after a crash: the same call with resume_from_checkpoint=True picks up where it stopped
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lmref.core.device import select_precision
from lmref.core.losses import causal_lm_loss_sum, loss_sums, target_count
from lmref.core.memory import PeakMemory
from lmref.core.ranks import rank_and_world
from lmref.core.tracking import track_run
from lmref.training.batches import check_eval_dataset, collate_input_ids, micro_batches, to_device
from lmref.training.checkpoints import atomic_folder, save_checkpoint, save_model_folder
from lmref.training.config import TrainingConfig, TrainResult
from lmref.training.metrics_log import (
    device_peak_flops,
    flops_per_token,
    log_record,
    run_lineage,
)
from lmref.training.parallel import ParallelPlan
from lmref.training.resume import make_scheduler, start_or_resume

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases and norm weights do not (decaying a gain towards 0 hurts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params)  # the fused kernel is one launch for all tensors
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        fused=fused or None,
        betas=(config.adam_beta1, config.adam_beta2),
    )


def train(
    model: torch.nn.Module,
    train_dataset,
    config: TrainingConfig,
    eval_dataset=None,
    collate_fn: Callable | None = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    loss_fn: LossFn = causal_lm_loss_sum,
    plan: ParallelPlan | None = None,
    final_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``config.max_steps`` optimizer steps; returns the run's numbers.

    ``loss_fn(model, batch)`` returns ``(loss summed over label tokens, label tokens)`` like
    ``lmref.core.losses.causal_lm_loss_sum`` (the default); e.g.
    ``lmref.training.distillation.distillation_loss(teacher)``. Evaluation stays plain
    cross-entropy (``evaluate_loss``).

    ``callbacks`` are called as ``callback(step, metrics)`` after every optimizer step on every
    rank; ``metrics`` holds loss, lr, grad norm, throughput and peak memory on logging steps, else
    the step alone. Raise in one to stop a run: that is how the notebooks and tests simulate a crash.

    ``plan`` is the parallelism (``lmref.training.parallel.make_plan``), applied to ``model``
    already; default: data parallelism over every rank (DDP when ``model`` is wrapped in it).

    ``final_dir``: save the trained model there at the end (Hugging Face format, manifest last).
    ``config.report_to`` tracks the run (``lmref.core.tracking``, rank 0): params, lineage, the
    logged metrics, and ``final_dir`` as its artifact ``model``; ``TrainResult.run_id`` names it.
    """
    config.validate()  # the fields may have been set after construction
    rank, world = _rank_and_world()
    plan = plan or ParallelPlan(data_rank=rank, data_world=world)
    plan.check_run(config, loss_fn, eval_dataset)
    is_main = rank == 0
    raw_model = plan.unwrap(model)
    device = next(raw_model.parameters()).device
    precision = select_precision(device, config.precision)
    autocast = (
        torch.autocast(
            device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        )
        if precision != "fp32"
        else nullcontext()
    )
    collate_fn = collate_fn or collate_input_ids
    if eval_dataset is not None:  # now, not at the first evaluation after hours of training
        check_eval_dataset(eval_dataset, config, collate_fn)
    out_dir = Path(config.output_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if config.gradient_checkpointing:
        raw_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        raw_model.config.use_cache = False

    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(raw_model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state, scheduler = start_or_resume(
        out_dir,
        config,
        raw_model,
        optimizer,
        make_scheduler(optimizer, config),
        scaler,
        len(train_dataset),
        rank,
        world,
        plan,
    )
    resumed_from = state["step"]

    # Compile the module we call, but save the raw one: no "_orig_mod." prefixes in checkpoints.
    forward_model = torch.compile(model) if config.torch_compile else model
    batches = micro_batches(
        train_dataset,
        config.per_device_train_batch_size,
        config.seed,
        plan.data_rank,  # tensor-parallel ranks read the same batches: one data rank
        plan.data_world,
        state["micro_step"],
        collate_fn,
    )
    token_flops = flops_per_token(raw_model, train_dataset)
    peak_flops = device_peak_flops(device)
    history: list[dict] = []
    window = {"loss": 0.0, "tokens": 0, "inputs": 0, "t0": time.perf_counter()}
    start_time, tokens_seen, eval_loss = time.perf_counter(), 0, None
    bar = tqdm(
        total=config.max_steps,
        initial=state["step"],
        desc="train",
        disable=config.disable_tqdm or not is_main,
        dynamic_ncols=True,
    )
    model.train()

    # The peak the run reports: core's one measurement. No garbage collection at entry: the
    # run reports the peak (a high-water mark), and a collection in every train() call costs a
    # notebook's hyperparameter search a fifth of each short trial.
    # The tracked run (nothing when report_to is none) ends FAILED if the loop raises.
    tracking = track_run(
        config.report_to,
        out_dir,
        config.run_name,
        params={**asdict(config), "parallel": plan.mode, "world_size": world},
        tags=lambda: {
            **run_lineage(raw_model, train_dataset, config),
            "resumed_from": str(resumed_from),
        },
        enabled=is_main,
    )
    with PeakMemory(device, collect_garbage=False) as memory, tracking as tracker:
        while state["step"] < config.max_steps:
            step_batches = [
                to_device(next(batches), device) for _ in range(config.gradient_accumulation_steps)
            ]
            state["micro_step"] += len(step_batches)
            step_tokens = plan.sum_over_data(sum(target_count(b) for b in step_batches), device)
            step_loss = torch.zeros((), device=device)
            for i, batch in enumerate(step_batches):
                # No gradient all-reduce (DDP) or reduce-scatter (FSDP) on accumulation micro-steps.
                with plan.sync(model, last=i == len(step_batches) - 1):
                    # backward of loss_sum * data_world / step_tokens: DDP and FSDP average
                    # gradients over data ranks, "* data_world" turns that average into a sum.
                    loss = plan.forward_backward(
                        forward_model, batch, loss_fn, step_tokens, autocast, scaler
                    )
                step_loss += loss
                window["inputs"] += batch["input_ids"].numel() * plan.data_world
            plan.finish_gradients(raw_model)
            scaler.unscale_(optimizer)
            grad_norm = plan.clip_grad_norm(trainable, config.max_grad_norm or math.inf)
            scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            step = state["step"]

            # Tensors accumulate on the device; .item() (a host sync) only on logging steps.
            window["loss"] = window["loss"] + step_loss
            window["tokens"] = window["tokens"] + step_tokens
            metrics = {"step": step}
            bar.update(1)
            if step % config.logging_steps == 0 or step == config.max_steps:
                seconds = time.perf_counter() - window["t0"]
                window_loss = plan.sum_over_data(window["loss"], device)  # step_tokens is global
                metrics.update(
                    loss=(window_loss / window["tokens"]).item(),
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=grad_norm.item(),
                    tokens_per_s=window["inputs"] / seconds,
                    world_size=world,  # an elastic job's changes show here
                )
                metrics["mfu"] = (
                    metrics["tokens_per_s"] * token_flops / (peak_flops * world)
                    if peak_flops
                    else None
                )
                metrics["memory_mb"] = memory.peak_so_far()
                tokens_seen += window["inputs"]
                state["last_train_loss"] = metrics["loss"]  # a resumed finished run reports it
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                )
                log_record(out_dir, metrics, is_main, history, tracker)
                window = {"loss": 0.0, "tokens": 0, "inputs": 0, "t0": time.perf_counter()}

            if eval_dataset is not None and (
                step == config.max_steps or (config.eval_steps and step % config.eval_steps == 0)
            ):
                with autocast:
                    eval_loss = evaluate_loss(
                        raw_model,
                        eval_dataset,
                        config.per_device_eval_batch_size,
                        collate_fn,
                        config.eval_max_batches,
                        plan,
                    )
                best = state["best_eval_loss"]
                if best is None or eval_loss < best:
                    state["best_eval_loss"] = eval_loss
                    if config.save_best_model and is_main:
                        with atomic_folder(out_dir / "best", manifest=True) as tmp:
                            raw_model.save_pretrained(tmp)
                log_record(
                    out_dir,
                    {"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)},
                    is_main,
                    history,
                    tracker,
                )
            if config.save_steps and (step % config.save_steps == 0 or step == config.max_steps):
                save_checkpoint(
                    out_dir,
                    raw_model,
                    optimizer,
                    scheduler,
                    scaler,
                    state,
                    config.save_total_limit,
                    is_main,
                    run_config={
                        "training": asdict(config),
                        "world_size": world,
                        "parallel": plan.mode,
                        "data_world": plan.data_world,
                    },
                    sharded=plan.sharded_state,
                )
            for callback in callbacks:
                callback(step, metrics)
        if final_dir is not None:
            save_model_folder(plan.full_model(model), Path(final_dir), is_main)
            tracker.log_model(final_dir)
    bar.close()

    seconds = time.perf_counter() - start_time
    train_losses = [h["loss"] for h in history if "loss" in h]
    return TrainResult(
        step=state["step"],
        train_loss=train_losses[-1] if train_losses else state.get("last_train_loss", math.nan),
        eval_loss=eval_loss,
        best_eval_loss=state["best_eval_loss"],
        tokens_seen=tokens_seen,
        train_seconds=seconds,
        tokens_per_second=tokens_seen / seconds if seconds else 0.0,
        peak_memory_mb=memory.peak_mb,
        resumed_from_step=resumed_from,
        history=history,
        run_id=tracker.run_id,
    )


class SimulatedFailure(RuntimeError):
    """Raised by ``fail_at_step``: a stand-in for a crash (OOM, preemption) to practise resuming."""


def fail_at_step(step: int) -> Callable[[int, dict], None]:
    """A callback for ``train(callbacks=...)`` that raises ``SimulatedFailure`` after ``step``."""

    def callback(current: int, metrics: dict) -> None:
        if current == step:
            raise SimulatedFailure(f"simulated failure after step {step}")

    return callback


def evaluate_loss(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 16,
    collate_fn: Callable | None = None,
    max_batches: int | None = None,
    plan: ParallelPlan | None = None,
) -> float:
    """Token-weighted mean NLL over ``dataset`` (sharded over data ranks under DDP or FSDP, the
    same batches on tensor-parallel ranks): the loss of ``lmref.core.losses.perplexity``, summed
    over ranks before the one division."""
    rank, world = _rank_and_world()
    plan = plan or ParallelPlan(data_rank=rank, data_world=world)
    rank, world = plan.data_rank, plan.data_world
    device = next(model.parameters()).device
    # Cap the samples before sharding, so 1 and N processes evaluate the same ones.
    limit = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    indices = list(range(limit))[rank::world]
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn or collate_input_ids,
        generator=torch.Generator(),
    )
    nll, tokens = loss_sums(model, (to_device(batch, device) for batch in loader))
    nll, tokens = plan.sum_over_data(torch.tensor([nll, tokens], dtype=torch.float64), device)
    nll, tokens = nll.item(), tokens.item()
    if tokens == 0:
        raise ValueError("the evaluation set has no label tokens")
    return nll / tokens


# ---------------------------------------------------------------- helpers


def _rank_and_world() -> tuple[int, int]:
    """``lmref.core.ranks``'s answer, refused when it names several processes without a group:
    the loop would shard the data over ranks whose gradients and sums no one adds up."""
    rank, world = rank_and_world()
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"this process is rank {rank} of {world} (torchrun's RANK and WORLD_SIZE) but has "
            "joined no process group: wrap the run in lmref.training.distributed.distributed() "
            "and the model in wrap_model(), or unset RANK/WORLD_SIZE for one process"
        )
    return rank, world
