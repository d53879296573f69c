"""The one peak-memory measurement: what a block of work added at its peak, on CPU and CUDA.

One meaning on both devices: the highest memory in use *during the block*, and that peak minus
what was in use at entry (what the block itself added). On CUDA that is the caching allocator's
``max_memory_allocated``, reset at entry. On CPU (Linux) it is the resident high-water mark
(``VmHWM``), reset at entry through ``/proc/self/clear_refs``. ``ru_maxrss`` is not used: it
cannot be reset, so in a notebook or a long process it reports the largest thing the process
ever did, not this block. Elsewhere the CPU figures are None.

Usage::

    from lmref.core.memory import PeakMemory

    with PeakMemory("cpu") as mem:
        train(...)
        mem.peak_so_far()                # the peak until now, inside the block
    mem.peak_mb, mem.added_mb

Blocks may nest (``lmref.training.loop.train`` measures itself; a benchmark measures around
it): the high-water mark is process-wide and entering a block resets it, so every enclosing
block first folds the peak reached so far into its own. An enclosing block's peak is therefore
never below an enclosed one's.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch

from lmref.core.device import resolve_device

# The blocks being measured, outermost first: a new one resets the process-wide high-water
# mark, so it first folds the current one into each of these.
_active: list[PeakMemory] = []


class PeakMemory:
    """Peak memory of a block, to compare fine-tuning methods run one after another.

    CUDA: the allocator's peak (``max_memory_allocated``) above what was allocated at entry.
    CPU (Linux): the process's resident high-water mark (``VmHWM``), reset at entry through
    ``/proc/self/clear_refs``, minus the resident memory at entry. ``ru_maxrss`` cannot be reset,
    so in a notebook it would report the largest thing the kernel ever did, not this block.
    Elsewhere the CPU figures are None.

        with PeakMemory() as mem:
            train(...)
        mem.peak_mb, mem.added_mb   # peak during the block; peak minus memory at entry
    """

    def __init__(self, device: torch.device | str = "auto", collect_garbage: bool = True):
        self.device = resolve_device(device)
        # A full collection costs about 0.3 s in a process holding the course's libraries and
        # data (2-core AMD EPYC): negligible around one benchmark, a fifth of an 8-step Optuna
        # trial when every train() pays it. Without it only ``added_mb`` can come out low.
        self.collect_garbage = collect_garbage
        self.peak_mb: float | None = None
        self.added_mb: float | None = None
        self._start = self._start_anon = None
        self._folded: float | None = None  # peak before an enclosed block reset the mark

    def _cpu_status(self, field_name: str) -> float | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match.group(1)) / 1024 if match else None

    def _high_water_mb(self) -> float | None:
        """The device's high-water mark since the last reset (of any block)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._cpu_status("VmHWM")

    def peak_so_far(self) -> float | None:
        """The peak of the block until now (callable inside it)."""
        now = self._high_water_mb()
        if now is None or self._folded is None:
            return now if self._folded is None else self._folded
        return max(now, self._folded)

    def __enter__(self) -> PeakMemory:
        # Earlier work's garbage (a model in a reference cycle) is collected now: freed inside
        # the block, it would offset this block's own allocations and hide them from the peak.
        if self.collect_garbage:
            gc.collect()
        for outer in _active:
            if outer.device.type == self.device.type:  # about to reset the mark they read
                outer._folded = outer.peak_so_far()
        _active.append(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self._start = self._cpu_status("VmRSS")
            self._start_anon = self._cpu_status("RssAnon")
        return self

    def __exit__(self, *exc) -> None:
        if self in _active:
            _active.remove(self)
        self.peak_mb = self.peak_so_far()
        if self.peak_mb is not None and self._start is not None:
            self.added_mb = self.peak_mb - self._start
        # RSS counts file-backed pages (mapped libraries, safetensors) too, and the kernel may
        # drop cold ones during the block, so RSS can fall as fast as the block allocates: in
        # a fresh-clone test run a 64 MiB tensor showed as 0.0 MB (on a VM whose DAMON pages
        # out cold memory). The anonymous memory still held at exit is a lower bound as well.
        end_anon = self._cpu_status("RssAnon") if self.device.type != "cuda" else None
        if self.added_mb is not None and end_anon is not None and self._start_anon is not None:
            self.added_mb = max(self.added_mb, end_anon - self._start_anon)
