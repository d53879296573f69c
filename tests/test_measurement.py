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


def test_cpu_features_reads_the_flags_line(tmp_path):
    from lmref.compression.measurement import cpu_features

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_int8 sse4_2\n"
    )
    assert cpu_features(info) == ["avx2", "avx512f", "amx_int8"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx\n")
    assert cpu_features(info) == []  # "avx" is not "avx2"
    assert cpu_features(tmp_path / "missing") == []


def test_decode_speed_is_the_median_and_range_of_the_repeats(monkeypatch):
    """measure() reports decode tokens/s as the median of its repeats with their range (a Spread
    that compare() reads), not the best one."""
    from types import SimpleNamespace

    from lmref.compression import measurement
    from lmref.core.stats import Spread, compare

    seconds = iter([0.5, 1.0, 2.0, 4.0, 8.0, 0.5])  # forwards and timed generations
    monkeypatch.setattr(
        measurement, "timed", lambda device, fn, *a, **k: (fn(*a, **k), next(seconds))
    )

    class Model(torch.nn.Module):
        config = SimpleNamespace(pad_token_id=0)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 8))

        def generate(self, prompts, **kwargs):
            return prompts

    m = measurement.measure(Model(), torch.ones(2, 8, dtype=torch.long), new_tokens=4, repeats=4)
    # 4 tokens in 1, 2, 4 and 8 s: 4, 2, 1, 0.5 tokens/s
    assert m.decode == Spread(1.5, 0.5, 4.0, 4)
    assert m.decode_tokens_per_s == 1.5 and m.as_row()["decode_repeats"] == 4
    assert compare(m.decode, Spread.of([10.0, 11.0, 12.0]), ("model", "other")) == "other > model"
    quality_only = measurement.measure(Model(), torch.ones(2, 8, dtype=torch.long), new_tokens=0)
    assert quality_only.decode is None
