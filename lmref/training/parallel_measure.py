"""Measuring what a parallelism scheme costs one rank, to set beside ``parallel_costs``' formulas:
bytes held for parameters, gradients and optimizer state; collectives and their bytes; and the
busy and idle time of a pipeline stage.

- ``held_bytes(model, optimizer)``: the bytes THIS rank holds, counting each storage once. A
  DTensor (FSDP2's shards, TP's sharded weights) counts its local tensor, padding included.
  Call it after ``optimizer.step()`` and before ``zero_grad()``: the steady state the
  16-bytes-a-parameter table describes (activations are gone, gradients still held).
- ``CommCounter``: a ``TorchDispatchMode`` that sees every ``torch.ops.c10d`` and functional
  collective this thread issues (the op list of torch's ``CommDebugMode``, which counts calls
  but not bytes) and adds up their payloads per kind and phase; on Linux it also reads the
  bytes this process wrote (``/proc/self/io`` wchar), which on gloo is what its TCP sockets sent.
- ``StageTimer``: wraps a ``torch.distributed.pipelining`` stage's ``forward_one_chunk`` and
  ``backward_one_chunk``, which the schedules call once the micro-batch's input has arrived, so
  their time is compute and the rest of a step is waiting (the bubble) or sending.

Usage::

    from lmref.training.parallel_measure import CommCounter, held_bytes

    with CommCounter() as comm:
        comm.phase = "forward"
        loss = model(**batch).loss
        comm.phase = "backward"
        loss.backward()
    comm.payload_bytes("all-gather", "forward"), comm.written_bytes
    optimizer.step()
    held_bytes(model, optimizer).params          # compare: parallel_costs.memory_per_rank(...)
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmref.training.parallel_costs import (
    ALL_GATHER,
    ALL_REDUCE,
    BROADCAST,
    REDUCE_SCATTER,
    RankMemory,
)

# ---------------------------------------------------------------- memory


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores: a DTensor's local shard, else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once:
    DDP's ``gradient_as_bucket_view`` gradients are views of its bucket)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or not isinstance(tensor, torch.Tensor):
            continue
        storage = _local(tensor).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in this rank's optimizer state (AdamW: exp_avg, exp_avg_sq and a one-element
    ``step`` a parameter). ``ZeroRedundancyOptimizer`` keeps its shard's state in ``.optim``."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: the local one
    return [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]


def held_bytes(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> RankMemory:
    """Parameters, gradients and optimizer state THIS rank holds, storages counted once.

    Measures the tensors the model and optimizer reference, not the allocator: DDP's default
    (``gradient_as_bucket_view=False``) keeps a second, bucketed copy of the gradients inside its
    C++ Reducer, which this does not see; with ``gradient_as_bucket_view=True`` the gradients are
    views of the buckets and this count is the whole of it. Between FSDP2's forward and backward
    the parameters it has gathered are plain tensors and count in full (``parameters`` then
    shows what ``reshard_after_forward`` keeps), while the shards it always holds are not visible
    through ``model.parameters()`` and do not count then.
    """
    params = list(model.parameters())
    return RankMemory(
        params=storage_bytes(params),
        grads=storage_bytes(p.grad for p in params),
        optimizer=storage_bytes(optimizer_state_tensors(optimizer)) if optimizer else 0,
    )


# ---------------------------------------------------------------- communication

# op name (after the namespace) -> (kind, which argument holds the payload, how to size it)
# c10d ops are what ProcessGroup calls dispatch to (DDP's Reducer and FSDP2 included); the
# _c10d_functional ops are DTensor's. "out" sizes the first argument (an all-gather's output),
# "in" the second (a reduce-scatter's input), "first" the tensor or tensor list in argument 0.
_OPS: dict[str, tuple[str, str]] = {
    "allreduce_": (ALL_REDUCE, "first"),
    "allreduce_coalesced_": (ALL_REDUCE, "first"),
    "all_reduce": (ALL_REDUCE, "first"),
    "all_reduce_coalesced": (ALL_REDUCE, "first"),
    "_allgather_base_": (ALL_GATHER, "first"),
    "allgather_": (ALL_GATHER, "first"),
    "allgather_coalesced_": (ALL_GATHER, "first"),
    "allgather_into_tensor_coalesced_": (ALL_GATHER, "first"),
    "all_gather_into_tensor": (ALL_GATHER, "gathered"),
    "all_gather_into_tensor_coalesced": (ALL_GATHER, "gathered"),
    "_reduce_scatter_base_": (REDUCE_SCATTER, "in"),
    "reduce_scatter_": (REDUCE_SCATTER, "in"),
    "reduce_scatter_tensor_coalesced_": (REDUCE_SCATTER, "in"),
    "reduce_scatter_tensor": (REDUCE_SCATTER, "first"),
    "reduce_scatter_tensor_coalesced": (REDUCE_SCATTER, "first"),
    "broadcast_": (BROADCAST, "first"),
    "broadcast": (BROADCAST, "first"),
    "alltoall_": ("all-to-all", "first"),
    "alltoall_base_": ("all-to-all", "first"),
    "all_to_all_single": ("all-to-all", "first"),
}
_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _written_bytes() -> int | None:
    """Bytes this process has written (sockets included) since it started, or None."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("wchar"))


class CommCounter(TorchDispatchMode):
    """Counts the collectives this thread issues inside the block: calls and payload bytes per
    (kind, phase). Set ``phase`` inside the block to split forward, backward and step.

    Payload: an all-reduce's or broadcast's tensor, an all-gather's output (the gathered whole),
    a reduce-scatter's input (the whole before scattering). ``parallel_costs.ring_send_bytes``
    turns payloads into the bytes a ring sends. ``written_bytes``: what the process wrote in the
    block (Linux ``wchar``; on gloo that is its TCP sends, plus any file or console writes, so
    keep the block free of them; NCCL's GPU traffic never shows there).

    Seen: DDP's bucket all-reduces (its C++ Reducer calls ``ProcessGroup::allreduce``, which
    dispatches to ``c10d.allreduce_``, and on CPU the backward runs in this thread, so no comm
    hook is needed), FSDP2's ``_allgather_base_`` and ``_reduce_scatter_base_``, DTensor's
    functional all-reduces, ``ZeroRedundancyOptimizer``'s broadcasts.
    """

    def __init__(self, phase: str = "step") -> None:
        super().__init__()
        self.phase = phase
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.payloads: dict[tuple[str, str], int] = defaultdict(int)
        self.written_bytes: int | None = None
        self._written_at_entry: int | None = None

    def __enter__(self) -> CommCounter:
        self._written_at_entry = _written_bytes()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        end = _written_bytes()
        if end is not None and self._written_at_entry is not None:
            self.written_bytes = end - self._written_at_entry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in _NAMESPACES and func.__name__.split(".")[0] in _OPS:
            kind, where = _OPS[func.__name__.split(".")[0]]
            if where == "in":
                size = _nbytes(args[1])
            elif where == "gathered":  # the functional all-gather returns it: input x group size
                size = _nbytes(args[0]) * int(args[1])
            else:
                size = _nbytes(args[0])
            self.calls[kind, self.phase] += 1
            self.payloads[kind, self.phase] += size
        return func(*args, **kwargs)

    def payload_bytes(self, kind: str, phase: str | None = None) -> int:
        """Payload bytes of ``kind`` in ``phase`` (all phases when None)."""
        return sum(v for (k, p), v in self.payloads.items() if k == kind and phase in (None, p))

    def call_count(self, kind: str, phase: str | None = None) -> int:
        return sum(v for (k, p), v in self.calls.items() if k == kind and phase in (None, p))

    def summary(self) -> list[dict]:
        """One row per (kind, phase): calls and payload bytes (JSON-ready)."""
        return [
            {"kind": k, "phase": p, "calls": self.calls[k, p], "payload_bytes": self.payloads[k, p]}
            for k, p in sorted(self.calls)
        ]


# ---------------------------------------------------------------- pipeline bubble


class StageTimer:
    """Records when a pipeline stage computes: ``(kind, start, end)`` for every
    ``forward_one_chunk`` / ``backward_one_chunk`` call on ``stage`` (a ``PipelineStage``).

    The schedule calls these after the micro-batch's activations (or gradients) have arrived, so
    their time is this rank's compute; ``busy_fraction`` over a step's wall time leaves the
    bubble plus the time spent posting sends and waiting.
    """

    def __init__(self, stage) -> None:
        self.intervals: list[tuple[str, float, float]] = []
        for kind in ("forward", "backward"):
            name = f"{kind}_one_chunk"
            setattr(stage, name, self._timed(kind, getattr(stage, name)))

    def _timed(self, kind: str, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.intervals.append((kind, start, time.perf_counter()))

        return timed

    def reset(self) -> None:
        self.intervals.clear()

    def busy_seconds(self) -> float:
        return sum(end - start for _, start, end in self.intervals)


def bubble_from_times(busy_s: float, wall_s: float) -> float:
    """The idle share of a step: 1 - busy / wall (0 when the stage never waited)."""
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    return max(0.0, 1.0 - busy_s / wall_s)
