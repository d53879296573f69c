"""Static batching, the baseline continuous batching is measured against (``StaticBatch``,
``ModelSpec.admission="static"``): alone, and in the engine against the default policy."""

from __future__ import annotations

import time

import pytest

from lmref.serving.engine import Engine, ModelSpec
from lmref.serving.metrics import EngineMetrics
from lmref.serving.request import Job, RequestStatus, SamplingParams
from lmref.serving.response_cache import ResponseCache
from lmref.serving.scheduler import POLICIES, FifoRowBudget, StaticBatch

pytestmark = pytest.mark.unit


def job_of(rows: int, **params) -> Job:
    job = Job("m", stream=False)
    for k in range(rows):
        job.add_row(f"prompt {k}", SamplingParams(**params))
    return job


def test_static_batch_admits_only_into_an_empty_batch():
    static, continuous = StaticBatch(max_rows=4), FifoRowBudget(max_rows=4)
    a, b, c = job_of(1), job_of(2), job_of(3)
    assert static.admit([a, b, c], running_rows=0) == [a, b]  # the budget, in order
    assert continuous.admit([a, b, c], running_rows=1) == [a, b]  # joins beside a running row
    assert static.admit([a, b, c], running_rows=1) == []  # waits for the whole batch
    assert static.admit([job_of(6)], running_rows=0) != []  # too big alone: still runs
    assert static.batch_rows == 4
    assert POLICIES == {"continuous": FifoRowBudget, "static": StaticBatch}


@pytest.mark.parametrize("admission", ["continuous", "static"])
def test_a_short_request_waits_for_the_running_one_only_when_static(tiny_model_dir, admission):
    spec = ModelSpec("m", str(tiny_model_dir), batch_wait_ms=0, admission=admission)
    engine = Engine(spec, EngineMetrics(), ResponseCache(0))
    engine.start()
    assert engine.loaded.wait(120) and engine.ready, engine.load_error
    try:
        long = job_of(1, max_tokens=200, temperature=0, ignore_eos=True)
        engine.submit(long)
        deadline = time.monotonic() + 60
        while long.rows[0].status is not RequestStatus.DECODING and time.monotonic() < deadline:
            time.sleep(0.001)
        short = job_of(1, max_tokens=2, temperature=0, ignore_eos=True)
        engine.submit(short)
        assert engine.results(short)[0].completion_tokens == 2
        assert engine.results(long)[0].completion_tokens == 200
        short_first = short.rows[0].last_token_at < long.rows[0].last_token_at
        assert short_first == (admission == "continuous")
        assert isinstance(engine.scheduler.policy, POLICIES[admission])
    finally:
        engine.close()
