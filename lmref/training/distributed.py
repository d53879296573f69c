"""Data parallelism under torchrun: process group setup and teardown, DDP wrapping, rank-0 I/O.

``torchrun`` starts one process per device and tells each who it is through environment
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). This module reads them,
joins the process group (NCCL bound to one GPU per process, gloo on CPU), wraps the model in
``DistributedDataParallel`` and tears the group down cleanly. Without a torchrun environment
everything is a no-op with world size 1, so one script runs as ``python train.py`` and as
``torchrun --nproc-per-node 8 train.py`` unchanged.

Data sharding (DistributedSampler, per-epoch shuffle), ``no_sync`` on accumulation micro-steps,
token-weighted all-reduced metrics and rank-0 checkpoints live in the training loop
(``lmref.training.loop.train``), which switches them on when it receives a DDP-wrapped model.

Fault injection from environment variables (to practise recovery) lives here too, since it runs
inside a worker. The launcher's side (the torchrun command line, single- and multi-node, and the
all-reduce arithmetic) is ``lmref.training.launch``; the runner that streams a launch's log
within a time limit is ``lmref.core.processes.run_logged``. Which rank this process is:
``lmref.core.ranks`` (the one rank/world policy), which this module's ``print0`` asks.

Usage::

    from lmref.training.distributed import distributed, wrap_model, print0

    with distributed() as env:                  # init_process_group, or nothing on 1 process
        model = wrap_model(build_model("tiny"), env)   # moved to env.device, DDP when world > 1
        train(model, dataset, config)           # lmref.training.loop.train is DDP-aware
        print0(f"done on {env.world_size} process(es)")
    # leaving the block: barrier, then destroy_process_group()

    # torchrun --standalone --nproc-per-node 2 -m lmref.train --max-steps 50
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lmref.core.ranks import is_main

# Environment variables of fault injection (read by ``fault_injection_from_env``).
FAIL_AT_STEP = "LMREF_FAIL_AT_STEP"  # the optimizer step after which a rank exits
FAIL_RANK = "LMREF_FAIL_RANK"  # which rank exits (default 0)
FAIL_ATTEMPT = "LMREF_FAIL_ATTEMPT"  # on which torchrun attempt (default 0: the first only)
FAIL_EXIT_CODE = "LMREF_FAIL_EXIT_CODE"  # the exit status (default 13)
STEP_SLEEP_S = "LMREF_STEP_SLEEP_S"  # seconds every rank sleeps after each optimizer step

_groups_joined = 0  # process groups this process has joined on torchrun's store (init_distributed)
# The DDP wrappers ``wrap_model`` made, so that ``cleanup`` can free their Reducers first.
_ddp_wrappers: weakref.WeakSet[DistributedDataParallel] = weakref.WeakSet()


@dataclass(frozen=True)
class DistEnv:
    """Who this process is, as torchrun describes it; world size 1 when not launched by torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: 0 on the first attempt
    launched: bool = False  # True when the torchrun variables are present

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """One GPU per process (``cuda:LOCAL_RANK``), else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Parse torchrun's variables; a clear error when they are partial or inconsistent."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return DistEnv()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
    if missing:
        raise ValueError(
            f"incomplete torchrun environment: {', '.join(missing)} not set "
            "(launch with torchrun, or unset RANK/WORLD_SIZE for one process)"
        )

    def integer(name: str, default: int | None = None) -> int:
        raw = environ.get(name)
        if raw is None:
            if default is None:
                raise ValueError(f"{name} is not set")
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None

    rank, world = integer("RANK"), integer("WORLD_SIZE")
    local_rank = integer("LOCAL_RANK", rank)
    local_world = integer("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if not 0 <= local_rank < local_world:
        raise ValueError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}")
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        master_addr=environ["MASTER_ADDR"],
        master_port=integer("MASTER_PORT"),
        restart_count=integer("TORCHELASTIC_RESTART_COUNT", 0),
        launched=True,
    )


def init_distributed(
    backend: str | None = None, timeout_s: float = 1800.0, env: DistEnv | None = None
) -> DistEnv:
    """Join the process group torchrun describes; a no-op (world size 1) outside torchrun.

    NCCL on CUDA, with this process bound to ``cuda:LOCAL_RANK`` *before* the group exists
    (else every rank's first collective lands on GPU 0); gloo on CPU. The timeout bounds how long
    a collective waits for a dead peer before raising, so a crash does not hang the job forever.
    """
    env = env or read_env()
    if not env.launched or dist.is_initialized():
        return env
    device = env.device
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one TCPStore across restarts (torch 2.13), yet the default
        # ``env://`` init does not prefix its keys by attempt: a restarted group then reads the
        # dead group's addresses and gloo fails with "Connection refused". One prefix an attempt
        # (pytorch/pytorch#135712). Elastic jobs whose nodes may join mid-job (and so disagree
        # on the restart count) should set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun
        # instead: rank 0 then hosts a fresh store each attempt and this branch is not taken.
        # The group count keeps a second group of the same attempt (init after cleanup, in every
        # rank alike) off the first one's keys too.
        global _groups_joined
        _groups_joined += 1
        store = dist.PrefixStore(
            f"lmref/attempt_{env.restart_count}/group_{_groups_joined}/",
            dist.TCPStore(
                env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout
            ),
        )
    dist.init_process_group(
        backend=backend,
        timeout=timeout,
        store=store,
        rank=env.rank if store else -1,
        world_size=env.world_size if store else -1,
        device_id=device if backend == "nccl" else None,
    )
    return env


def barrier() -> None:
    """Wait for every rank (nothing to wait for outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup(wait: bool = True) -> None:
    """Leave the process group: a barrier, the DDP Reducers freed, then ``destroy_process_group()``.

    Without the barrier a fast rank destroys its gloo context while a slower one still talks to
    it, and the slow one aborts (SIGABRT) at exit: about 3 runs in 10 on this machine, 0 in 10
    with it. ``wait=False`` skips the barrier when a peer may be gone (an exception unwinding).
    Why the Reducers go first: ``_release_reducers``. A model wrapped by ``wrap_model`` cannot
    run its DDP forward after this (there is no group left to run it on anyway).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        barrier()
    _release_reducers()
    dist.destroy_process_group()


def _release_reducers() -> None:
    """Free the C++ Reducer of every live DDP wrapper (and the Logger that shares it) now.

    A Reducer owns a reference to the process group, and pybind11 frees a Reducer *with the GIL
    held*. If it holds the last reference (after ``destroy_process_group``), freeing the model
    runs ``~ProcessGroupGloo``, which joins gloo's worker threads while one of them may wait for
    the GIL to free a finished work's Python objects: a deadlock, and a job that has finished its
    work never exits (seen about 1 launch in 20 on a loaded 2-core machine; py-spy: main thread
    ``Reducer::~Reducer -> ~ProcessGroupGloo -> thread::join``, gloo thread ``runLoop ->
    ~AsyncWork -> decref``, waiting for the GIL). Freed while the group is still registered, a
    Reducer drops a reference that is not the last, and the group dies through its Python binding,
    which releases the GIL before joining (pytorch/pytorch#56297).
    """
    for ddp in list(_ddp_wrappers):
        for name in ("logger", "reducer"):  # the Logger holds the Reducer too
            ddp.__dict__.pop(name, None)


@contextmanager
def distributed(backend: str | None = None, timeout_s: float = 1800.0) -> Iterator[DistEnv]:
    """``init_distributed()`` on entry, ``cleanup()`` on exit (no barrier when raising)."""
    env = init_distributed(backend, timeout_s)
    try:
        yield env
    except BaseException:
        cleanup(wait=False)  # a peer may be dead: a barrier would wait for it until the timeout
        raise
    cleanup()


def wrap_model(model: torch.nn.Module, env: DistEnv | None = None, **ddp_kwargs) -> torch.nn.Module:
    """Move ``model`` to this rank's device; wrap it in DDP when a process group is up.

    DDP broadcasts rank 0's weights at construction, so ranks start identical even if their
    random initialisations differed. Wrap with this rather than ``DistributedDataParallel``
    directly: ``cleanup`` then frees the wrapper's Reducer safely (``_release_reducers``).
    """
    env = env or read_env()
    device = env.device
    model = model.to(device)
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    wrapped = DistributedDataParallel(model, **ddp_kwargs)
    _ddp_wrappers.add(wrapped)  # cleanup() frees its Reducer before the group goes
    return wrapped


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (what to save), or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushed: torchrun pipes the output, which would buffer it)."""
    if is_main():
        print(*args, **{"flush": True, **kwargs})


# ---------------------------------------------------------------- fault injection


def fault_injection_from_env(
    environ: Mapping[str, str] | None = None, env: DistEnv | None = None
) -> Callable[[int, dict], None] | None:
    """A ``train(callbacks=...)`` callback that kills this process hard, or None when not asked.

    ``LMREF_FAIL_AT_STEP=k LMREF_FAIL_RANK=r``: rank r exits with ``os._exit`` right after
    optimizer step k, on the first torchrun attempt only (``LMREF_FAIL_ATTEMPT``, compared with
    ``TORCHELASTIC_RESTART_COUNT``), so with ``--max-restarts 1`` the restarted group finishes.
    ``os._exit`` skips every cleanup handler, like a segfault or an OOM kill would.
    """
    environ = os.environ if environ is None else environ
    if not environ.get(FAIL_AT_STEP):
        return None
    env = env or read_env(environ)
    try:
        at_step = int(environ[FAIL_AT_STEP])
        fail_rank = int(environ.get(FAIL_RANK, 0))
        attempt = int(environ.get(FAIL_ATTEMPT, 0))
        exit_code = int(environ.get(FAIL_EXIT_CODE, 13))
    except ValueError as error:
        raise ValueError(f"fault injection variables must be integers: {error}") from None
    if at_step < 1:
        raise ValueError(f"{FAIL_AT_STEP} must be >= 1, got {at_step}")
    if env.rank != fail_rank or env.restart_count != attempt:
        return None

    def fail(step: int, metrics: dict) -> None:
        if step == at_step:
            print(
                f"[rank {env.rank}] fault injection: exiting with status {exit_code} after step "
                f"{step} (attempt {env.restart_count})",
                file=sys.stderr,
                flush=True,
            )
            os._exit(exit_code)

    return fail


def pacing_from_env(environ: Mapping[str, str] | None = None) -> Callable[[int, dict], None] | None:
    """A ``train(callbacks=...)`` callback that sleeps ``LMREF_STEP_SLEEP_S`` seconds after every
    optimizer step, or None when not asked: a tiny model's steps take milliseconds, too fast to
    kill or add a node mid-run on purpose (``lmref.lab.elastic``)."""
    environ = os.environ if environ is None else environ
    if not environ.get(STEP_SLEEP_S):
        return None
    seconds = float(environ[STEP_SLEEP_S])

    def pace(step: int, metrics: dict) -> None:
        time.sleep(seconds)

    return pace
