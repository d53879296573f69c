"""The engine's waiting queue and who gets into the running batch: a replaceable admission policy.

``Scheduler`` is the thread-safe part (a bounded queue of ``Job``s, the wait for work, closing);
which waiting jobs start is an ``AdmissionPolicy``, a plain object with no locks or model, so a
different policy (priorities, a token budget, shortest-prompt-first) is a class of a few lines and
is testable alone. The default, ``FifoRowBudget``, is the engine's policy: first come first
served, whole jobs, as many rows as fit beside the running ones in ``max_rows``; a job larger
than the whole budget still starts when the batch is empty (else it would never run): that is
continuous batching. ``StaticBatch`` is the baseline it is measured against: the same budget,
but jobs start only when the batch is empty, so a batch is admitted together and nothing joins
until its longest row has finished. ``POLICIES`` names both (``ModelSpec.admission``).

Usage::

    from lmref.serving.scheduler import FifoRowBudget, Scheduler

    scheduler = Scheduler(FifoRowBudget(max_rows=16), max_queue_rows=256, gather_s=0.005)
    # or POLICIES["static"](max_rows=16): static batching
    scheduler.submit(job)                           # QueueFull when too many rows wait
    jobs = scheduler.next_jobs(busy_rows=0, prefilling=False)   # worker side; None: closed
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lmref.serving.request import EngineError, Job, QueueFull


class AdmissionPolicy(Protocol):
    """Which waiting jobs start now. ``batch_rows``: how many rows an idle worker gathers (for
    up to the scheduler's ``gather_s``) before starting, so a burst is prefilled together."""

    batch_rows: int

    def admit(self, waiting: Sequence[Job], running_rows: int) -> list[Job]:
        """The jobs (a subset of ``waiting``, in the order to start) that join now."""
        ...


@dataclass
class FifoRowBudget:
    """First come first served, whole jobs, while the rows fit in ``max_rows``; the first job
    in the queue blocks those behind it (no overtaking: a large job cannot starve)."""

    max_rows: int = 16

    @property
    def batch_rows(self) -> int:
        return self.max_rows

    def admit(self, waiting: Sequence[Job], running_rows: int) -> list[Job]:
        jobs, rows = [], running_rows
        for job in waiting:
            if rows and rows + len(job.rows) > self.max_rows:
                break
            jobs.append(job)
            rows += len(job.rows)
        return jobs


@dataclass
class StaticBatch(FifoRowBudget):
    """Static batching: ``FifoRowBudget``'s batch, admitted only when no row runs. Finished rows
    still leave the batch at once (their compute stops), but their places stay empty until the
    whole batch is done: newcomers wait for the longest row of the batch before them."""

    def admit(self, waiting: Sequence[Job], running_rows: int) -> list[Job]:
        return [] if running_rows else super().admit(waiting, 0)


# ``ModelSpec.admission`` -> the policy class, built with ``max_rows=spec.max_batch_size``.
POLICIES: dict[str, type[FifoRowBudget]] = {"continuous": FifoRowBudget, "static": StaticBatch}


class Scheduler:
    """A bounded, thread-safe queue of jobs that the engine's worker draws from by a policy.

    ``on_waiting(rows)`` is called (under the lock, so calls are in order) whenever the number
    of waiting rows changes: the engine's gauge."""

    def __init__(
        self,
        policy: AdmissionPolicy,
        max_queue_rows: int = 256,
        gather_s: float = 0.005,
        on_waiting: Callable[[int], None] = lambda rows: None,
    ) -> None:
        self.policy, self.max_queue_rows, self.gather_s = policy, max_queue_rows, gather_s
        self._on_waiting = on_waiting
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self.waiting_rows = 0
        self.closed = False

    def _set_waiting(self, rows: int) -> None:
        self.waiting_rows = rows
        self._on_waiting(rows)

    def submit(self, job: Job) -> None:
        """Queue a job's rows: EngineError("closed") when closed, QueueFull when over the bound."""
        rows = len(job.rows)
        with self._cond:
            if self.closed:
                raise EngineError("closed", "server is shutting down", code="shutting_down")
            if self.waiting_rows + rows > self.max_queue_rows:
                raise QueueFull()
            self._waiting.append(job)
            self._set_waiting(self.waiting_rows + rows)
            self._cond.notify_all()

    def remove(self, job: Job) -> int:
        """Take a job out of the queue if it waits there; the rows removed (0: it did not)."""
        with self._cond:
            if job not in self._waiting:
                return 0
            self._waiting.remove(job)
            self._set_waiting(self.waiting_rows - len(job.rows))
            return len(job.rows)

    def close(self) -> list[Job]:
        """No more jobs; the ones still waiting are returned (the caller fails them)."""
        with self._cond:
            self.closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._set_waiting(0)
            self._cond.notify_all()
        return waiting

    def next_jobs(self, busy_rows: int, prefilling: bool) -> list[Job] | None:
        """Jobs to start now, beside ``busy_rows`` running or prefilling rows. An idle worker
        blocks until work comes, then gathers for ``gather_s``; a busy one never waits. While a
        prefill is under way nothing starts: newcomers make the next prefill group. None: closed
        and nothing left to run."""
        with self._cond:
            while not self._waiting and not busy_rows and not self.closed:
                self._cond.wait()
            if self.closed:
                return [] if busy_rows else None
            if prefilling or not self._waiting:
                return []
            if not busy_rows:  # a burst of requests is prefilled together
                deadline = self._waiting[0].arrival + self.gather_s
                while self.waiting_rows < self.policy.batch_rows and not self.closed:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            jobs = self.policy.admit(tuple(self._waiting), busy_rows)
            for job in jobs:
                self._waiting.remove(job)
            self._set_waiting(self.waiting_rows - sum(len(job.rows) for job in jobs))
            return jobs
