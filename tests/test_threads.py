"""``lmref.core.threads.release_openmp_workers``: the calling thread's OpenMP workers leave (counted
as the process's native threads), and torch computes the same afterwards, here and in the
thread an engine would run on."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from lmref.core.threads import _loaded_libgomp, release_openmp_workers

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(_loaded_libgomp() is None, reason="torch's OpenMP here is not libgomp"),
]


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _parallel_work() -> torch.Tensor:
    return torch.ones(4_000_000).cumsum(0)[-1] + (torch.ones(256, 256) @ torch.ones(256, 256)).sum()


def _settle(expected: int, seconds: float = 5.0) -> int:
    deadline = time.monotonic() + seconds  # freed workers exit on their own, a moment later
    while _native_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return _native_threads()


def test_the_calling_threads_workers_leave_and_torch_still_computes():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = _parallel_work()  # this thread's pool: one worker besides itself
        with_pool = _native_threads()
        assert release_openmp_workers()
        assert _settle(with_pool - 1) == with_pool - 1
        assert torch.equal(_parallel_work(), expected)  # a new pool, the same result
        assert _native_threads() == with_pool
        assert release_openmp_workers()
        elsewhere = {}
        worker = threading.Thread(target=lambda: elsewhere.setdefault("x", _parallel_work()))
        worker.start()
        worker.join()
        assert torch.equal(elsewhere["x"], expected)
    finally:
        torch.set_num_threads(threads)
