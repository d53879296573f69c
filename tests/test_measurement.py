"""Timing in lmref.compression.measurement: every clock read on a GPU waits for the device."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.unit


def test_timed_synchronizes_cuda_before_each_clock_read(monkeypatch):
    """CUDA queues kernels and returns: an unsynchronized clock measures the queueing. timed()
    waits for the device before the start and before the end reading (this machine may have no
    GPU, so torch.cuda.synchronize and the clock are recorders here)."""
    from types import SimpleNamespace

    from lmref.compression import measurement

    events = []
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device)))
    )
    monkeypatch.setattr(
        measurement,
        "time",
        SimpleNamespace(perf_counter=lambda: events.append("clock") or len(events)),
    )
    result, seconds = measurement.timed("cuda:1", lambda x: events.append("work") or x * 2, 21)
    assert result == 42
    assert events == [("sync", "cuda:1"), "clock", "work", ("sync", "cuda:1"), "clock"]
    assert seconds == 5 - 2
    events.clear()
    measurement.timed(torch.device("cpu"), lambda: events.append("work"))
    assert events == ["clock", "work", "clock"]  # nothing to wait for on CPU
