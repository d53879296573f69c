"""Launching data-parallel jobs and reasoning about them on paper: the torchrun command line
(one node or several), a free port, the difference between two runs' weights, and the ring
all-reduce arithmetic behind a DDP step's communication time.

The worker's side (process group, DDP wrapping, fault injection) is
``lmref.training.distributed``; running a launch with a time limit and its log streamed is
``lmref.core.processes.run_logged``.

Usage::

    from lmref.training.launch import format_command, torchrun_command

    command = torchrun_command(["-m", "lmref.train", "--max-steps", "50"], nproc_per_node=2)
    print(format_command(command, {"OMP_NUM_THREADS": 1}))
    # multi-node: torchrun_command(args, 8, nnodes=2, rdzv_endpoint="node0:29500")
"""

from __future__ import annotations

import shlex
import socket
import sys
from collections.abc import Mapping, Sequence

import torch

# ---------------------------------------------------------------- launching


def torchrun_command(
    args: Sequence[str],
    nproc_per_node: int = 2,
    *,
    nnodes: int | str = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "lmref",
    max_restarts: int = 0,
    launcher: Sequence[str] | None = None,
) -> list[str]:
    """The torchrun command line for ``args`` (e.g. ``["-m", "lmref.train", "--max-steps", "9"]``).

    One node: ``--standalone`` (a local rendezvous on a free port). Several: every node runs the
    same command; the c10d rendezvous at ``rdzv_endpoint`` (host:port of one node) assigns ranks.
    ``nnodes`` may be a range such as ``"2:4"`` for elastic jobs. ``launcher`` defaults to this
    interpreter's ``-m torch.distributed.run`` (what the ``torchrun`` script runs), which works
    where the script is not on PATH; pass ``["torchrun"]`` to print the familiar form.
    """
    launcher = list(launcher) if launcher else [sys.executable, "-m", "torch.distributed.run"]
    if str(nnodes) == "1" and rdzv_endpoint is None:
        options = ["--standalone", f"--nnodes={nnodes}"]
    else:
        if rdzv_endpoint is None:
            raise ValueError("a multi-node launch needs rdzv_endpoint='host:port' of one node")
        options = [
            f"--nnodes={nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
    options += [f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}"]
    return [*launcher, *options, *args]


def format_command(command: Sequence[str], environ: Mapping[str, str] | None = None) -> str:
    """A copy-pasteable shell line (``VAR=value ... cmd args``)."""
    prefix = [f"{k}={shlex.quote(str(v))}" for k, v in (environ or {}).items()]
    return " ".join([*prefix, shlex.join(command)])


def find_free_port() -> int:
    """A TCP port free right now (for MASTER_PORT when not using ``--standalone``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_abs_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest element-wise difference between two state dicts with the same keys (0.0: equal)."""
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)


# ---------------------------------------------------------------- communication arithmetic


def ring_allreduce_bytes(num_elements: int, world_size: int, bytes_per_element: int = 4) -> float:
    """Bytes each rank sends (and receives) to all-reduce ``num_elements`` values with a ring.

    A ring all-reduce is a reduce-scatter then an all-gather, each moving (N-1)/N of the data
    through every rank: 2 (N-1)/N x the gradient bytes per step, nearly independent of N.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return 2 * (world_size - 1) / world_size * num_elements * bytes_per_element


def ddp_step_estimate(
    num_params: int,
    tokens_per_step: int,
    world_size: int,
    bus_bandwidth_gbs: float,
    peak_flops: float,
    mfu: float = 0.4,
    grad_bytes: int = 4,
) -> dict:
    """On-paper DDP step: compute time per rank, gradient all-reduce time, their ratio.

    ``tokens_per_step`` is per rank; compute is 6 N FLOPs a token (forward + backward).
    DDP overlaps the all-reduce (in ~25 MB buckets) with the backward pass, so a step takes
    about max(compute, communication) when communication is under the backward's ~2/3 share.
    """
    compute_s = 6 * num_params * tokens_per_step / (peak_flops * mfu)
    comm_bytes = ring_allreduce_bytes(num_params, world_size, grad_bytes)
    comm_s = comm_bytes / (bus_bandwidth_gbs * 1e9)
    return {
        "compute_s": compute_s,
        "allreduce_bytes": comm_bytes,
        "allreduce_s": comm_s,
        "comm_to_compute": comm_s / compute_s,
        "step_s_overlapped": max(compute_s, comm_s),
        "step_s_serial": compute_s + comm_s,
    }
