"""Starting a run afresh or resuming it: which checkpoint, what it restores, and how changed
settings are applied from the resumed step on.

A fresh run owns its ``output_dir``: stale logs and checkpoints go, so a later resume cannot
pick them up. A resume takes the checkpoint ``resume_from_checkpoint`` names (``True``: the
newest that verifies), refuses settings that differ from the checkpoint's unless
``allow_config_change`` (``lmref.training.config.check_config_change``), and then rebuilds the
schedule and converts the data position to the new batch size.

Usage::

    from lmref.training.resume import start_or_resume

    state, scheduler = start_or_resume(out_dir, config, model, optimizer, scheduler, scaler,
                                       num_samples=len(dataset), rank=0, world=1)
    state["step"], state["micro_step"]      # where the loop continues
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lmref.core.manifest import MANIFEST
from lmref.training.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_run_config,
    verify_checkpoint,
)
from lmref.training.config import TrainingConfig, check_config_change
from lmref.training.metrics_log import METRICS, truncate_metrics


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, last_step: int = 0):
    """Linear warmup, then cosine to ``learning_rate * min_lr_ratio`` at ``max_steps``; read at
    ``last_step`` (the constructor steps once, to it)."""
    # Imported here, not at the top: transformers.optimization imports peft and bitsandbytes
    # (through trainer_utils), 4.5 of its 7 s of import under load on the 2-core AMD EPYC, which
    # every module importing the loop would pay even when it never trains.
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        config.warmup_steps,
        config.max_steps,
        min_lr_rate=config.min_lr_ratio,
        last_epoch=last_step - 1,
    )


def start_or_resume(
    out_dir: Path,
    config: TrainingConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    num_samples: int,
    rank: int = 0,
    world: int = 1,
    plan=None,
) -> tuple[dict, object]:
    """The trainer state to continue from (step, data position, best eval loss) and the
    scheduler to use (a new one when settings changed). Restores weights, optimizer, scheduler,
    scaler and RNG from the checkpoint, or seeds a fresh run and clears ``out_dir``. ``plan``
    (``lmref.training.parallel``): a sharded one loads on every rank, and its data ranks (not
    all ranks) set the data position when the world size changed."""
    is_main = rank == 0
    checkpoint = find_checkpoint(out_dir, config.resume_from_checkpoint, is_main)
    if checkpoint is None:
        torch.manual_seed(config.seed + rank)  # ranks draw different dropout masks
        if (
            is_main
        ):  # a fresh run owns its output_dir: stale logs/checkpoints would mislead a resume
            (out_dir / METRICS).unlink(missing_ok=True)
            for old in out_dir.glob("checkpoint-*"):
                shutil.rmtree(old)
        return {"step": 0, "micro_step": 0, "best_eval_loss": None}, scheduler
    saved = read_run_config(checkpoint)
    changed = check_config_change(saved, config, world, is_main)
    sharded = plan is not None and plan.sharded_state
    state = load_checkpoint(
        checkpoint, model, optimizer, None if changed else scheduler, scaler, sharded=sharded
    )
    if changed:
        scheduler = apply_new_settings(optimizer, config, state["step"])
        data_world = world if plan is None else plan.data_world
        state["micro_step"] = rescale_data_position(
            state["micro_step"], num_samples, saved, config, data_world
        )
    truncate_metrics(out_dir / METRICS, state["step"], is_main)
    return state, scheduler


def find_checkpoint(out_dir: Path, resume: bool | str, is_main: bool = True) -> Path | None:
    """The checkpoint to resume from: none when not resuming (or none exists yet, as a first
    torchrun attempt expects), the newest that verifies for ``True``, else the path given."""
    if not resume:
        return None
    if resume is True:
        return latest_checkpoint(out_dir, warn=is_main)
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"no checkpoint at {resume}")
    reason = verify_checkpoint(resume)
    if reason is not None and (Path(resume) / MANIFEST).exists():
        raise CheckpointError(f"checkpoint {resume} is damaged: {reason}")
    return Path(resume)


def apply_new_settings(optimizer: torch.optim.Optimizer, config: TrainingConfig, step: int):
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
    return make_scheduler(optimizer, config, last_step=step)


def rescale_data_position(
    micro_step: int, samples: int, saved: dict | None, config: TrainingConfig, world: int
) -> int:
    """The data position in micro-batches of the new size: same epoch, same share of it done.

    Rounded up to the next whole batch, so no sample is seen twice within the epoch.
    """
    if saved is None:
        return micro_step
    old_batch = saved["training"]["per_device_train_batch_size"]
    old_world = saved.get("data_world", saved["world_size"])  # TP ranks shared their batches
    old_per_epoch = samples // old_world // old_batch
    new_per_epoch = samples // world // config.per_device_train_batch_size
    if old_per_epoch == 0 or new_per_epoch == 0:
        return micro_step  # the loop's batching raises the clear error for the new size
    epoch, offset = divmod(micro_step, old_per_epoch)
    done = offset * old_batch * old_world
    return epoch * new_per_epoch + min(
        -(-done // (config.per_device_train_batch_size * world)), new_per_epoch
    )
