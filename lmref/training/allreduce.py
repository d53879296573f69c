"""All-reduce from scratch: the ring (a reduce-scatter, then an all-gather, over N chunks) and the
naive all-to-one, written with point-to-point sends and counting the bytes each rank sends; and a
launcher that runs both on real gloo processes and checks them against ``dist.all_reduce``.

DDP's gradient all-reduce is this ring (NCCL's and gloo's, in C++). Each of the N ranks cuts its
tensor into N chunks. In the reduce-scatter, N-1 steps, every rank sends one chunk to its right
neighbour and adds the chunk from its left one; afterwards rank r holds the full sum of chunk
(r+1) mod N. In the all-gather, N-1 more steps, the summed chunks travel once round the ring.
Every rank sends 2 (N-1) chunks of 1/N of the tensor: 2 (N-1)/N of its bytes whatever N is, the
optimum (Patarasuk & Yuan 2009). The all-to-one sends everything to rank 0, which adds and sends
the sum back: rank 0 sends (N-1) x the tensor, a load that grows with N.

Usage::

    from lmref.training.allreduce import ring_allreduce, run_allreduce_check

    # inside a process group (torchrun, or run_allreduce_check's processes):
    traffic = ring_allreduce(grads)             # grads summed in place on every rank
    traffic.sent                                # bytes this rank sent: 2 (N-1)/N x grads' bytes

    # from a notebook or test: N gloo processes on 127.0.0.1, checked against dist.all_reduce
    check = run_allreduce_check(world_size=2, numel=1 << 20, repeats=5, timeout_s=120)
    check.max_difference["ring vs dist.all_reduce"]   # 0.0 on 2 ranks: a + b either way
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmref.core.ranks import rank_and_world
from lmref.training.launch import find_free_port

REDUCE_SCATTER = "reduce-scatter"
ALL_GATHER = "all-gather"
METHODS = ("ring", "all-to-one", "dist.all_reduce")


@dataclass(frozen=True)
class RingStep:
    """One step of one rank in a ring all-reduce: which chunk leaves, which arrives."""

    phase: str  # REDUCE_SCATTER (the arriving chunk is added) or ALL_GATHER (it is copied)
    step: int  # 0 .. N-2 within the phase
    send_chunk: int  # sent to the right neighbour, rank + 1
    recv_chunk: int  # received from the left neighbour, rank - 1


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sent and received in one all-reduce."""

    sent: int
    received: int


def ring_schedule(rank: int, world_size: int) -> list[RingStep]:
    """The 2 (N-1) steps of ``rank``: reduce-scatter, then all-gather.

    At reduce-scatter step s rank r sends chunk r-s (its own at s = 0, then the partial sum it
    has just added to) and receives chunk r-s-1, so after N-1 steps chunk r+1 holds every rank's
    contribution on rank r. The all-gather then passes each finished chunk once round the ring.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    n = world_size
    reduce = [RingStep(REDUCE_SCATTER, s, (rank - s) % n, (rank - s - 1) % n) for s in range(n - 1)]
    gather = [RingStep(ALL_GATHER, s, (rank - s + 1) % n, (rank - s) % n) for s in range(n - 1)]
    return reduce + gather


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def ring_allreduce(tensor: torch.Tensor) -> Traffic:
    """Sum ``tensor`` over the process group in place with a ring; this rank's traffic.

    A step posts its send and its receive together (``isend``/``irecv``) and waits for both:
    with a blocking ``send`` first, every rank would wait for a neighbour that is itself sending.
    """
    rank, world = rank_and_world()
    if not tensor.is_contiguous() or tensor.numel() < world:
        raise ValueError(f"a contiguous tensor of >= {world} elements, one chunk per rank")
    chunks = tensor.view(-1).tensor_split(world)  # views: writing a chunk writes the tensor
    right, left = (rank + 1) % world, (rank - 1) % world
    sent = received = 0
    for step in ring_schedule(rank, world):
        outgoing, target = chunks[step.send_chunk], chunks[step.recv_chunk]
        incoming = torch.empty_like(target) if step.phase == REDUCE_SCATTER else target
        for request in (dist.isend(outgoing, right), dist.irecv(incoming, left)):
            request.wait()
        if step.phase == REDUCE_SCATTER:
            target += incoming
        sent, received = sent + _nbytes(outgoing), received + _nbytes(incoming)
    return Traffic(sent, received)


def naive_allreduce(tensor: torch.Tensor, root: int = 0) -> Traffic:
    """Sum ``tensor`` in place by sending every tensor to ``root``, which adds them up and sends
    the sum back to each rank: the root's link carries 2 (N-1) x the tensor."""
    rank, world = rank_and_world()
    if rank != root:
        dist.send(tensor, root)
        dist.recv(tensor, root)
        return Traffic(_nbytes(tensor), _nbytes(tensor))
    incoming = torch.empty_like(tensor)
    peers = [r for r in range(world) if r != root]
    for peer in peers:
        dist.recv(incoming, peer)
        tensor += incoming
    for peer in peers:
        dist.send(tensor, peer)
    return Traffic(len(peers) * _nbytes(tensor), len(peers) * _nbytes(tensor))


def rank_tensor(rank: int, numel: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """The tensor rank ``rank`` contributes (seeded, so any process can rebuild every rank's)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    return torch.randn(numel, generator=generator, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- running it on real processes


@dataclass(frozen=True)
class AllReduceCheck:
    """What ``run_allreduce_check`` measured: traffic, agreement and times, per method."""

    world_size: int
    numel: int
    tensor_bytes: int
    sent: dict[str, list[int]]  # method -> bytes sent by each rank (dist.all_reduce not counted)
    max_difference: dict[str, float]  # "ring vs dist.all_reduce", "... vs exact sum" (float64)
    ranks_agree: dict[str, bool]  # every rank ended with bit-identical results
    seconds: dict[str, list[float]]  # method -> rank 0's wall time of each repeat


def _worker(
    rank: int, world: int, port: int, numel: int, repeats: int, seed: int, out_dir: str
) -> None:
    """One rank of ``run_allreduce_check``: each method on the same tensors, results to JSON."""
    os.environ["OMP_NUM_THREADS"] = "1"  # one core a rank, as one GPU a rank
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a lost peer raises instead of hanging
    )
    mine = rank_tensor(rank, numel, seed)
    functions = {
        "ring": ring_allreduce,
        "all-to-one": naive_allreduce,
        "dist.all_reduce": dist.all_reduce,
    }
    results, sent, seconds = {}, {}, {}
    for method, function in functions.items():
        seconds[method] = []
        for _ in range(max(1, repeats)):
            tensor = mine.clone()
            dist.barrier()  # every rank starts together: the time is the collective's
            start = time.perf_counter()
            traffic = function(tensor)
            seconds[method].append(time.perf_counter() - start)
        results[method], sent[method] = tensor, getattr(traffic, "sent", None)
    exact = sum(rank_tensor(r, numel, seed, torch.float64) for r in range(world))
    record = {
        "sent": sent,
        "seconds": seconds,
        "sha256": {m: hashlib.sha256(t.numpy().tobytes()).hexdigest() for m, t in results.items()},
        "max_difference": {
            f"{m} vs dist.all_reduce": (t - results["dist.all_reduce"]).abs().max().item()
            for m, t in results.items()
            if m != "dist.all_reduce"
        }
        | {
            f"{m} vs exact sum": (t.double() - exact).abs().max().item() for m, t in results.items()
        },
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()  # on gloo a rank that leaves first can abort its peer's last exchange
    dist.destroy_process_group()


def run_allreduce_check(
    world_size: int = 2,
    numel: int = 1 << 20,
    repeats: int = 5,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> AllReduceCheck:
    """Start ``world_size`` gloo processes on 127.0.0.1 (spawned, one thread each), run the ring,
    the all-to-one and ``dist.all_reduce`` on the same seeded float32 tensors, and collect what
    each rank saw. Bounded: past ``timeout_s`` every rank is killed and ``TimeoutError`` raised;
    a rank's exception is re-raised here with its traceback."""
    with tempfile.TemporaryDirectory(prefix="allreduce-") as out_dir:
        args = (world_size, find_free_port(), numel, repeats, seed, out_dir)
        context = mp.start_processes(
            _worker, args=args, nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world_size} ranks did not finish in {timeout_s:.0f} s")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]
    return AllReduceCheck(
        world_size=world_size,
        numel=numel,
        tensor_bytes=numel * 4,
        sent={m: [r["sent"][m] for r in ranks] for m in METHODS if m != "dist.all_reduce"},
        max_difference={
            k: max(r["max_difference"][k] for r in ranks) for k in ranks[0]["max_difference"]
        },
        ranks_agree={m: len({r["sha256"][m] for r in ranks}) == 1 for m in METHODS},
        seconds=ranks[0]["seconds"],
    )
