"""Which process this is: the one rank/world policy for logging, writing files and sharding.

Inside an initialized process group the group answers. Before one exists (or after it is gone),
torchrun's environment variables (``RANK``, ``WORLD_SIZE``) answer, so a worker that has not yet
joined does not take itself for rank 0 and write what only rank 0 may write. Without either,
this is the only process: rank 0 of 1.

Usage::

    from lmref.core.ranks import rank_and_world, is_main

    rank, world = rank_and_world()
    if is_main():
        save(...)
"""

from __future__ import annotations

import os

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def get_rank() -> int:
    return rank_and_world()[0]


def get_world_size() -> int:
    return rank_and_world()[1]


def is_main() -> bool:
    """True on rank 0 (and when there is one process): the rank that logs and writes files."""
    return get_rank() == 0
