"""Continuous batching in the engine (lmref.serving.engine over lmref.serving.batching), on the tiny random Llama:
a request sent while another decodes joins it and finishes first, a long prompt's prefill runs
in chunks between the running rows' decode steps, a shared prompt start is computed once, and
every greedy text is the one the same request gets alone."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from lmref.serving.batching import Prefill, PrefixCache, RunningBatch
from lmref.serving.engine import (
    Admitted,
    Delta,
    Engine,
    EngineMetrics,
    Finished,
    Job,
    ModelSpec,
    ResponseCache,
    SamplingParams,
)

pytestmark = pytest.mark.unit  # engines in threads of this process


def make_engine(path, **spec) -> Engine:
    torch.set_num_threads(1)
    engine = Engine(
        ModelSpec("tiny", str(path), batch_wait_ms=0, **spec), EngineMetrics(), ResponseCache(0)
    )
    engine.start()
    assert engine.loaded.wait(120) and engine.ready, engine.load_error
    return engine


def job(prompt: str, max_tokens: int, stream: bool = False) -> Job:
    j = Job("tiny", stream=stream)
    j.add_row(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return j


def next_event(j: Job, kind: type, timeout: float = 60.0):
    """Events of ``j`` until one of ``kind`` (the others are dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        event = j.events.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(event, kind):
            return event


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = make_engine(tiny_model_dir, max_batch_size=8)
    yield e
    e.close()


def alone(engine: Engine, prompt: str, max_tokens: int) -> str:
    j = job(prompt, max_tokens)
    engine.submit(j)
    return engine.results(j)[0].text


def test_request_sent_mid_decode_joins_and_finishes_first(engine):
    long, short = job("def long_running(", 200, stream=True), job("class Short", 6)
    engine.submit(long)
    next_event(long, Delta)  # the long row is decoding now
    engine.submit(short)
    short_text = engine.results(short)[0].text
    # Static batching would queue the short request until the long one ends (200 tokens).
    seen = []
    while True:
        try:
            seen.append(long.events.get_nowait())
        except queue.Empty:
            break
    assert not any(isinstance(e, Finished) for e in seen), "the long row finished first"
    assert long.rows[0].completion_tokens < 200
    long_text = next_event(long, Finished, 120).text
    assert short_text == alone(engine, "class Short", 6)
    assert long_text == alone(engine, "def long_running(", 200)


def test_many_rows_joining_and_leaving_keep_their_greedy_text(engine):
    prompts = [(f"item {i} of the list" * (1 + i % 3), 3 + 5 * (i % 4)) for i in range(12)]
    expected = [alone(engine, p, n) for p, n in prompts]
    jobs = []
    for p, n in prompts:  # staggered: rows join a batch whose rows are at different steps
        jobs.append(job(p, n))
        engine.submit(jobs[-1])
        time.sleep(0.01)
    assert [engine.results(j)[0].text for j in jobs] == expected


def test_long_prefill_runs_in_chunks_between_decode_steps(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_batch_size=8, prefill_chunk_tokens=4)
    try:
        prompt = " ".join(f"word{i}" for i in range(40))
        long_prompt = job(prompt, 5, stream=True)
        expected_text = alone(engine, prompt, 5)
        running = job("def running(", 200, stream=True)
        engine.submit(running)
        next_event(running, Delta)
        engine.submit(long_prompt)
        next_event(long_prompt, Admitted)
        before = running.rows[0].completion_tokens
        next_event(long_prompt, Delta)
        during = running.rows[0].completion_tokens - before
        chunks = -(-len(long_prompt.rows[0].prompt_ids) // 4)
        assert chunks >= 8 and during >= chunks - 2, (chunks, during)  # not stalled meanwhile
        assert next_event(long_prompt, Finished).text == expected_text
        assert next_event(running, Finished, 120).completion_tokens == 200
    finally:
        engine.close()


def test_join_pads_the_shorter_cache_and_leave_trims_padding(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    batch = RunningBatch(model)
    short, long = Prefill(model, [[5, 6]], pad_id=0), Prefill(model, [list(range(3, 13))], 0, 3)
    assert short.step() is not None
    while long.step() is None:
        pass
    batch.join(short)
    batch.join(long)
    assert len(batch) == 2 and batch.attention.shape == (2, 10)
    assert batch.attention[0].tolist() == [0] * 8 + [1] * 2
    assert batch.next_position.flatten().tolist() == [2, 10]
    assert batch.step([7, 13]).shape[0] == 2
    batch.leave([0])  # the long row leaves: the short one needs its last 3 columns only
    assert batch.attention.tolist() == [[1, 1, 1]]
    assert batch.cache.layers[0].keys.shape[2] == 3
    batch.leave([])
    assert len(batch) == 0


SHARED = (
    "The following is a list of the names, values and types defined in the module, "
    "sorted by name and written one per line: "
)


def test_shared_prompt_start_is_computed_once_and_changes_no_text(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(SHARED + end)["input_ids"] for end in ("alpha", "beta gamma", "x")]
    prefix = PrefixCache(model, min_tokens=16)
    Prefill(model, prompts[:1], 0, prefix=prefix)  # nothing to share yet
    with_prefix = Prefill(model, prompts[1:], 0, prefix=prefix)
    assert with_prefix.shared >= 16 and len(prefix.ids) >= 16
    assert with_prefix.ids.shape[1] < max(len(p) for p in prompts[1:])  # the rest runs only
    plain = Prefill(model, prompts[1:], 0)
    assert plain.shared == 0
    a, b = with_prefix.step(), plain.step()
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_engine_with_and_without_prefix_cache_write_the_same(tiny_model_dir, engine):
    off = make_engine(tiny_model_dir, max_batch_size=8, prefix_cache_min_tokens=0)
    try:
        prompts = [SHARED + end for end in ("alpha", "beta", "gamma delta", "epsilon")]
        jobs = [job(p, 12) for p in prompts]
        for j in jobs:
            engine.submit(j)
        texts = [engine.results(j)[0].text for j in jobs]
        assert len(engine._prefix.ids) >= 16  # the shared start was cached and used
        assert texts == [alone(off, p, 12) for p in prompts]
        assert not off._prefix.ids
    finally:
        off.close()
