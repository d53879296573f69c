"""The training loop's batches: the default collator, the resumable shuffled micro-batch
stream sharded over ranks, and the check that an evaluation set holds tokens to score.

The position in the training data is one counter (micro-batches drawn so far): every epoch is a
seeded permutation split across ranks, so a resume at any micro-step continues with exactly the
batches an uninterrupted run would have drawn.

Usage::

    from lmref.training.batches import collate_input_ids, micro_batches

    stream = micro_batches(dataset, batch_size=8, seed=0, rank=0, world=1,
                           start_micro_step=0, collate_fn=collate_input_ids)
    batch = next(stream)                       # {"input_ids": LongTensor (8, seq)}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lmref.core.losses import target_count
from lmref.training.config import TrainingConfig


def collate_input_ids(rows: list[dict]) -> dict:
    """Default collator for packed blocks: stack ``input_ids`` (labels = inputs, shifted in the loss)."""
    return {"input_ids": torch.tensor([list(r["input_ids"]) for r in rows], dtype=torch.long)}


def micro_batches(
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


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of ``batch`` on ``device`` (copied asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
        if target_count((collate_fn or collate_input_ids)(rows)) > 0:
            return
    raise ValueError(
        f"eval_dataset has no label tokens in the {limit} sample(s) it would evaluate "
        f"(of {len(dataset)}): empty, every label ignored or padded, or one-token sequences. "
        "Pass another eval_dataset, or none."
    )
