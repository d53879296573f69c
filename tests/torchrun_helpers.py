"""Helpers shared by the torchrun tests (test_distributed, test_parallel): a bounded launch of
real torchrun jobs with one thread per process, tiny data sets of token blocks, and reading a
run's final weights and metrics.

Usage::

    from torchrun_helpers import launch, weights, write_blocks

    data = write_blocks(tmp_path / "blocks", samples=24, seq=16, vocab=512)
    launch(["-m", "lmref.train", "--parallel", "fsdp", ...], nproc=2).check()
    final = weights(out_dir)
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file

from lmref.core.processes import RunLog, run_logged
from lmref.training import launch as L

# One thread per process: 2 processes on 2 cores; no hub access.
LAUNCH_ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
ROOT = Path(__file__).resolve().parent.parent


def launch(
    args: list[str],
    nproc: int = 2,
    max_restarts: int = 0,
    extra_env: dict | None = None,
    timeout_s: float = 300,
    echo=False,
) -> RunLog:
    command = L.torchrun_command(args, nproc, max_restarts=max_restarts)
    return run_logged(
        command, timeout_s, env={**LAUNCH_ENV, **(extra_env or {})}, cwd=ROOT, echo=echo
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def metric_steps(run_dir: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def write_blocks(path: Path, samples: int, seq: int, vocab: int) -> Path:
    """Random token blocks whose first token is the block's index, so a batch tells which
    samples it holds; saved with ``datasets.save_to_disk``."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (samples, seq), generator=g)
    rows[:, 0] = torch.arange(samples)
    datasets.Dataset.from_dict({"input_ids": rows.tolist()}).save_to_disk(str(path))
    return path
