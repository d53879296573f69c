"""The server's allocator policy (lmref.core.allocator): with ``keep_freed_memory``, memory a
thread other than the main one frees stays in the process for the next burst; without it,
glibc gives the block back to the system. Each case runs in a fresh process: the setting is
process-wide, and the test process keeps glibc's defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

# A thread (as the engine's worker) touches 256 MiB and frees it, twice; after each burst,
# prints how many MiB more than at the start the process holds.
BURSTS = """
import re, sys, threading
import torch
from lmref.core.allocator import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory()

def resident_mib():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read())[1]) / 1024

def burst():
    block = torch.ones(64 * 2**20)  # 256 MiB, every page written
    del block

start = resident_mib()
for _ in range(2):
    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()
    print(resident_mib() - start)
"""


def held_after_bursts(mode: str) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", BURSTS, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    ).stdout
    return [float(line) for line in out.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting, read in /proc")
def test_freed_memory_stays_for_the_next_burst_only_when_kept():
    default, kept = held_after_bursts("default"), held_after_bursts("keep")
    assert default[0] < 64 and default[1] < 64  # given back after each burst
    assert kept[0] > 0.9 * 256  # still held after the first
    assert kept[1] < kept[0] + 64  # and the second burst reused it


def test_without_a_glibc_nothing_is_changed(monkeypatch, caplog):
    import ctypes.util

    from lmref.core.allocator import keep_freed_memory

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc-that-is-not-here.so")
    with caplog.at_level("INFO", logger="lmref.core.allocator"):
        assert keep_freed_memory() is False
    assert "libc-that-is-not-here.so has no glibc mallopt" in caplog.text


def test_a_batch_worker_keeps_freed_memory_only_where_it_runs_the_engine(monkeypatch):
    from lmref.production import worker
    from lmref.production.celery_app import BatchConfig

    called = []
    monkeypatch.setattr(worker, "keep_freed_memory", lambda: called.append(True))
    monkeypatch.setattr(worker.BatchWorker, "serving", property(lambda self: called.append(False)))
    worker.BatchWorker(BatchConfig(), env={}).load()
    assert called == [True, False]  # the policy first, then the engine loads
    worker.BatchWorker(BatchConfig(), env={"LMREF_WORKER_UPSTREAM": "http://127.0.0.1:1"}).load()
    assert called == [True, False]  # a forwarding worker runs no engine: its allocator is left
