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
  all-reduce on accumulation micro-steps, rank 0 alone writes files.

Only parameters with ``requires_grad`` are trained and checkpointed, so a peft LoRA model goes
through the same loop. Checkpoint folders are written and verified by ``lmref.training.checkpoints`` (the
one other lmref module this one needs: copy both).

Usage::

    from lmref.training.loop import TrainingConfig, train

    config = TrainingConfig(output_dir="artifacts/run", max_steps=200, learning_rate=3e-3,
                            per_device_train_batch_size=16, eval_steps=50, save_steps=50)
    result = train(model, corpus["train"], config, eval_dataset=corpus["validation"])
    print(result.best_eval_loss, result.tokens_per_second)
    # after a crash: the same call with resume_from_checkpoint=True picks up where it stopped
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from lmref.training.checkpoints import (  # noqa: F401  (save/load/verify re-exported: one import for a run)
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_run_config,
    save_checkpoint,
    verify_checkpoint,
)
from lmref.core.device import select_precision

# bf16 dense peak of common accelerators, for MFU (model FLOPs utilisation).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}


@dataclass
class TrainingConfig:
    """Knobs of a run; names follow Hugging Face ``TrainingArguments`` where one exists."""

    output_dir: str = "artifacts/run"
    max_steps: int = 100
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    torch_compile: bool = False
    gradient_checkpointing: bool = False
    eval_steps: int = 0  # 0: evaluate once, at the end
    per_device_eval_batch_size: int = 16
    eval_max_batches: int | None = None
    save_steps: int = 0  # 0: no checkpoints
    save_total_limit: int = 2
    save_best_model: bool = False  # save_pretrained into output_dir/best on a new best eval loss
    logging_steps: int = 10
    seed: int = 0
    resume_from_checkpoint: bool | str = False  # True: the latest in output_dir; or a path
    # Resume although settings differ from the checkpoint's. The new values then hold from the
    # resumed step on: the lr schedule is rebuilt with the new peak/warmup/floor/length and read at
    # that step, AdamW's betas and weight decay are replaced, and the data position is converted
    # to batches of the new size (same epoch, same share of it done).
    allow_config_change: bool = False
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot make a sensible run."""
        at_least = {
            "max_steps": 1,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "per_device_eval_batch_size": 1,
            "logging_steps": 1,
            "save_total_limit": 1,
            "warmup_steps": 0,
            "eval_steps": 0,
            "save_steps": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"TrainingConfig.{name} must be an integer >= {low}, got {value!r}"
                )
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ValueError(
                f"TrainingConfig.eval_max_batches must be None or >= 1, "
                f"got {self.eval_max_batches!r}"
            )
        if not (isinstance(self.learning_rate, int | float) and self.learning_rate > 0):
            raise ValueError(
                f"TrainingConfig.learning_rate must be > 0, got {self.learning_rate!r}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"TrainingConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"TrainingConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm!r}"
            )


# Settings that do not change the trained weights: they may differ on resume without a word.
BOOKKEEPING_FIELDS = frozenset(
    {
        "output_dir",
        "resume_from_checkpoint",
        "allow_config_change",
        "disable_tqdm",
        "logging_steps",
        "eval_steps",
        "per_device_eval_batch_size",
        "eval_max_batches",
        "save_steps",
        "save_total_limit",
        "save_best_model",
    }
)


@dataclass
class TrainResult:
    step: int
    train_loss: float
    eval_loss: float | None
    best_eval_loss: float | None
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    resumed_from_step: int = 0
    history: list[dict] = field(default_factory=list)


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


def causal_lm_loss_sum(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL over the label tokens, and how many there were.

    A sum, not a mean: the caller divides by the tokens of the whole optimizer step, so every
    token weighs the same whatever micro-batch or rank it landed on (labels -100 are ignored).
    """
    labels = batch.get("labels", batch["input_ids"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the largest tensor of
    # the step (batch x sequence x vocabulary) before the loss and again in backward.
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    return loss, (targets != -100).sum()


def collate_input_ids(rows: list[dict]) -> dict:
    """Default collator for packed blocks: stack ``input_ids`` (labels = inputs, shifted in the loss)."""
    return {"input_ids": torch.tensor([list(r["input_ids"]) for r in rows], dtype=torch.long)}


def train(
    model: torch.nn.Module,
    train_dataset,
    config: TrainingConfig,
    eval_dataset=None,
    collate_fn: Callable | None = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    loss_fn: Callable[
        [torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]
    ] = causal_lm_loss_sum,
) -> TrainResult:
    """Train ``model`` in place for ``config.max_steps`` optimizer steps; returns the run's numbers.

    ``loss_fn(model, batch)`` returns ``(loss summed over label tokens, label tokens)`` like
    ``causal_lm_loss_sum`` (the default); e.g. ``lmref.training.distillation.distillation_loss(teacher)``.
    Evaluation stays plain cross-entropy.

    ``callbacks`` are called as ``callback(step, metrics)`` after every optimizer step on every
    rank; ``metrics`` holds loss, lr, grad norm and throughput on logging steps, else the step
    alone. Raise in one to stop a run: that is how the notebooks and tests simulate a crash.
    """
    config.validate()  # the fields may have been set after construction
    rank, world = _rank_and_world()
    is_main = rank == 0
    raw_model = model.module if isinstance(model, DistributedDataParallel) else model
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
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_ratio
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = {"step": 0, "micro_step": 0, "best_eval_loss": None}

    checkpoint = _find_checkpoint(out_dir, config.resume_from_checkpoint, is_main)
    if checkpoint is not None:
        changed = check_config_change(read_run_config(checkpoint), config, world, is_main)
        state = load_checkpoint(
            checkpoint, raw_model, optimizer, None if changed else scheduler, scaler
        )
        if changed:
            scheduler = _apply_new_settings(optimizer, config, state["step"])
            state["micro_step"] = _rescale_data_position(
                state["micro_step"], len(train_dataset), read_run_config(checkpoint), config, world
            )
        _truncate_metrics(out_dir / "metrics.jsonl", state["step"], is_main)
    else:
        torch.manual_seed(config.seed + rank)  # ranks draw different dropout masks
        if (
            is_main
        ):  # a fresh run owns its output_dir: stale logs/checkpoints would mislead a resume
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
            for old in out_dir.glob("checkpoint-*"):
                shutil.rmtree(old)
    resumed_from = state["step"]

    # Compile the module we call, but save the raw one: no "_orig_mod." prefixes in checkpoints.
    forward_model = torch.compile(model) if config.torch_compile else model
    batches = _micro_batches(
        train_dataset,
        config.per_device_train_batch_size,
        config.seed,
        rank,
        world,
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

    while state["step"] < config.max_steps:
        micro_batches = [
            _to_device(next(batches), device) for _ in range(config.gradient_accumulation_steps)
        ]
        state["micro_step"] += len(micro_batches)
        step_tokens = _all_reduce_sum(sum(_label_tokens(b) for b in micro_batches), device)
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients in backward(); on all but the last micro-step that is waste.
            sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:
                    loss_sum, _ = loss_fn(forward_model, batch)
                # DDP averages gradients over ranks; "* world" turns that average into a sum.
                scaler.scale(loss_sum * world / step_tokens).backward()
            step_loss += loss_sum.detach()
            window["inputs"] += batch["input_ids"].numel() * world
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or math.inf)
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
            window_loss = _all_reduce_sum(window["loss"], device)  # step_tokens is global already
            metrics.update(
                loss=(window_loss / window["tokens"]).item(),
                lr=scheduler.get_last_lr()[0],
                grad_norm=grad_norm.item(),
                tokens_per_s=window["inputs"] / seconds,
            )
            metrics["mfu"] = (
                metrics["tokens_per_s"] * token_flops / (peak_flops * world) if peak_flops else None
            )
            metrics["memory_mb"] = peak_memory_mb(device)
            tokens_seen += window["inputs"]
            state["last_train_loss"] = metrics["loss"]  # a resumed finished run still reports it
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            _log(out_dir, metrics, is_main, history)
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
                )
            best = state["best_eval_loss"]
            if best is None or eval_loss < best:
                state["best_eval_loss"] = eval_loss
                if config.save_best_model and is_main:
                    _atomic_save_pretrained(raw_model, out_dir / "best")
            _log(
                out_dir,
                {"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)},
                is_main,
                history,
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
                run_config={"training": asdict(config), "world_size": world},
            )
        for callback in callbacks:
            callback(step, metrics)

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
        peak_memory_mb=peak_memory_mb(device),
        resumed_from_step=resumed_from,
        history=history,
    )


class ConfigChangeError(ValueError):
    """Resuming with settings that differ from the checkpoint's, without ``allow_config_change``."""


class SimulatedFailure(RuntimeError):
    """Raised by ``fail_at_step``: a stand-in for a crash (OOM, preemption) to practise resuming."""


def fail_at_step(step: int) -> Callable[[int, dict], None]:
    """A callback for ``train(callbacks=...)`` that raises ``SimulatedFailure`` after ``step``."""

    def callback(current: int, metrics: dict) -> None:
        if current == step:
            raise SimulatedFailure(f"simulated failure after step {step}")

    return callback


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 16,
    collate_fn: Callable | None = None,
    max_batches: int | None = None,
) -> float:
    """Token-weighted mean NLL over ``dataset`` (sharded over ranks under DDP)."""
    rank, world = _rank_and_world()
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
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        loss_sum, n = causal_lm_loss_sum(model, _to_device(batch, device))
        total += torch.stack([loss_sum.double(), n.double()])
    model.train(was_training)
    loss_sum, n = _all_reduce_sum(total, device).tolist()
    if n == 0:
        raise ValueError("the evaluation set has no label tokens")
    return loss_sum / n


# ---------------------------------------------------------------- checkpoints


def check_config_change(
    saved: dict | None, config: TrainingConfig, world: int = 1, is_main: bool = True
) -> list[str]:
    """The settings (and world size) that differ from the checkpoint's, as ``"name: old -> new"``.

    Settings that only change what is logged or saved (``BOOKKEEPING_FIELDS``) are not compared.
    Raises ``ConfigChangeError`` listing them unless ``config.allow_config_change``; then warns and
    returns them, and ``train`` applies the new values from the resumed step on (see there).
    """
    if saved is None:
        return []
    now = {**asdict(config), "world_size": world}
    before = {**saved["training"], "world_size": saved["world_size"]}
    changes = [
        f"{k}: {before[k]!r} -> {now[k]!r}"
        for k in sorted(now)
        if k in before and k not in BOOKKEEPING_FIELDS and _differs(before[k], now[k])
    ]
    if changes and not config.allow_config_change:
        raise ConfigChangeError(
            "the checkpoint was written with other settings: "
            + "; ".join(changes)
            + ". Resume with the same settings, or set allow_config_change=True "
            "(--allow-config-change) to continue with the new ones."
        )
    if changes and is_main:
        warnings.warn("resuming with changed settings: " + "; ".join(changes), stacklevel=2)
    return changes


def _differs(a, b) -> bool:
    return json.loads(json.dumps(a)) != json.loads(json.dumps(b))  # tuples vs JSON lists


def _apply_new_settings(optimizer, config: TrainingConfig, step: int):
    """After an allowed change: optimizer hyperparameters and the schedule from ``config``.

    ``optimizer.load_state_dict`` brought back the old lr, betas and weight decay, and the old
    scheduler would keep the old peak. The schedule is rebuilt with the new peak, warmup, floor
    and length, evaluated at the resumed step, as if the run had used them from the start
    (so a new peak lr is not jumped to through a fresh warmup; past the old end the lr is the floor).
    """
    for group, decay in zip(optimizer.param_groups, (config.weight_decay, 0.0)):
        group.update(
            initial_lr=config.learning_rate,
            weight_decay=decay,
            betas=(config.adam_beta1, config.adam_beta2),
        )
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        config.warmup_steps,
        config.max_steps,
        min_lr_rate=config.min_lr_ratio,
        last_epoch=step - 1,
    )  # the constructor steps once, to ``step``


def _rescale_data_position(
    micro_step: int, samples: int, saved: dict | None, config: TrainingConfig, world: int
) -> int:
    """The data position in micro-batches of the new size: same epoch, same share of it done.

    Rounded up to the next whole batch, so no sample is seen twice within the epoch.
    """
    if saved is None:
        return micro_step
    old_batch, old_world = saved["training"]["per_device_train_batch_size"], saved["world_size"]
    old_per_epoch = samples // old_world // old_batch
    new_per_epoch = samples // world // config.per_device_train_batch_size
    if old_per_epoch == 0 or new_per_epoch == 0:
        return micro_step  # _micro_batches raises the clear error for the new size
    epoch, offset = divmod(micro_step, old_per_epoch)
    done = offset * old_batch * old_world
    return epoch * new_per_epoch + min(
        -(-done // (config.per_device_train_batch_size * world)), new_per_epoch
    )


def check_eval_dataset(dataset, config: TrainingConfig, collate_fn: Callable | None = None) -> None:
    """Raise ``ValueError`` when the samples ``evaluate_loss`` would use hold no label token."""
    batch_size = config.per_device_eval_batch_size
    limit = (
        len(dataset)
        if config.eval_max_batches is None
        else min(len(dataset), config.eval_max_batches * batch_size)
    )
    for start in range(0, limit, batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, limit))]
        if _label_tokens((collate_fn or collate_input_ids)(rows)) > 0:
            return
    raise ValueError(
        f"eval_dataset has no label tokens in the {limit} sample(s) it would evaluate "
        f"(of {len(dataset)}): empty, every label -100, or one-token sequences. "
        "Pass another eval_dataset, or none."
    )


# ---------------------------------------------------------------- helpers


def _find_checkpoint(out_dir: Path, resume: bool | str, is_main: bool = True) -> Path | None:
    if not resume:
        return None
    if resume is True:
        return latest_checkpoint(out_dir, warn=is_main)  # none: a fresh start, as torchrun expects
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"no checkpoint at {resume}")
    reason = verify_checkpoint(resume)
    if reason is not None and (Path(resume) / MANIFEST).exists():
        raise CheckpointError(f"checkpoint {resume} is damaged: {reason}")
    return Path(resume)


def _micro_batches(
    dataset,
    batch_size: int,
    seed: int,
    rank: int,
    world: int,
    start_micro_step: int,
    collate_fn: Callable,
) -> Iterator[dict]:
    """Shuffled micro-batches forever, resumable at any micro-step.

    Every epoch is one seeded permutation split across ranks (DistributedSampler), so the
    position in the data is a single counter and ranks together see each sample once an epoch.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples make no batch of {batch_size} on {world} rank(s)")
    epoch, offset = divmod(start_micro_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)
        order = [indices[i * batch_size : (i + 1) * batch_size] for i in range(offset, per_epoch)]
        # A generator of its own: each new DataLoader iterator otherwise draws a seed from the
        # global RNG, which would shift dropout after a resume that starts mid-epoch.
        yield from DataLoader(
            dataset, batch_sampler=order, collate_fn=collate_fn, generator=torch.Generator()
        )
        epoch, offset = epoch + 1, 0


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(value, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(value, device=device)
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def _label_tokens(batch: dict) -> torch.Tensor:
    return (batch.get("labels", batch["input_ids"])[:, 1:] != -100).sum()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def flops_per_token(model: torch.nn.Module, dataset) -> float:
    """6 N (forward + backward matmuls) + attention, as in the PaLM paper's appendix B."""
    config = getattr(model, "config", None)
    n = sum(p.numel() for p in model.parameters())
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    seq = len(dataset[0]["input_ids"]) if len(dataset) else 0
    return 6 * n + 12 * layers * hidden * seq


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def _log(out_dir: Path, record: dict, is_main: bool, history: list[dict]) -> None:
    history.append(record)
    if is_main:
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int, is_main: bool) -> None:
    """On resume, drop the lines an interrupted run logged after its last checkpoint."""
    if is_main and path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                pass  # a line torn by the crash itself
        path.write_text("".join(line + "\n" for line in kept))


def _atomic_save_pretrained(model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
