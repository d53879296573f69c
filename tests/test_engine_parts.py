"""The serving engine's parts, each on its own: the scheduler and its admission policy (no model),
the incremental detokenizer and stop hold-back against the full-decode algorithm the engine used
before, the output processor (a tokenizer, no model), request states, and the KV-cache keyword
transformers 5.24 renamed (no deprecation warning while generating)."""

from __future__ import annotations

import random
import threading
import time
import warnings
from pathlib import Path

import pytest

from lmref.serving.detokenizer import IncrementalDetokenizer, TextStream, held_back
from lmref.serving.engine import Engine, ModelSpec
from lmref.serving.metrics import EngineMetrics
from lmref.serving.outputs import OutputProcessor
from lmref.serving.request import (
    Delta,
    EngineError,
    Failed,
    Finished,
    Job,
    QueueFull,
    RequestStatus,
    SamplingParams,
)
from lmref.serving.response_cache import ResponseCache
from lmref.serving.scheduler import FifoRowBudget, Scheduler

pytestmark = pytest.mark.unit

REAL_TOKENIZER = Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-135m-instruct"
TEXTS = [
    "def add(a, b):\n    return a + b  # sum",
    "naïve café — smørrebrød, 😀 and は日本語です。🎉🎉",
    "Ünïcödé 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok😀done xyは!",
]


def job_of(rows: int, stream: bool = False, **params) -> Job:
    job = Job("m", stream)
    for k in range(rows):
        job.add_row(f"prompt {k}", SamplingParams(**params))
    return job


# -- scheduler: no model, no engine


def test_fifo_row_budget_admits_whole_jobs_in_order_within_the_budget():
    policy = FifoRowBudget(max_rows=5)
    a, b, c = job_of(2), job_of(3), job_of(4)
    assert policy.admit([a, b, c], running_rows=0) == [a, b]
    assert policy.admit([a, b, c], running_rows=3) == [a]
    assert policy.admit([c, a], running_rows=2) == []  # the first blocks: no overtaking
    big = job_of(7)
    assert policy.admit([big, a], running_rows=0) == [big]  # alone it runs, or it never would
    assert policy.admit([big], running_rows=1) == []


class SmallestFirst:
    """Another policy: the smallest waiting job first, one job at a time."""

    batch_rows = 1

    def admit(self, waiting, running_rows):
        return [min(waiting, key=lambda job: len(job.rows))] if not running_rows else []


def test_scheduler_queue_bounds_gathering_closing_and_a_replaced_policy():
    seen: list[int] = []
    scheduler = Scheduler(FifoRowBudget(4), max_queue_rows=5, gather_s=5.0, on_waiting=seen.append)
    first, second = job_of(2), job_of(2)
    scheduler.submit(first)
    with pytest.raises(QueueFull):
        scheduler.submit(job_of(4))
    threading.Timer(0.2, scheduler.submit, [second]).start()
    started = time.perf_counter()
    # Idle: it gathers until the batch is full (4 rows), not for all of gather_s.
    assert scheduler.next_jobs(busy_rows=0, prefilling=False) == [first, second]
    assert 0.15 < time.perf_counter() - started < 4.0
    third = job_of(1)
    scheduler.submit(third)
    assert scheduler.next_jobs(busy_rows=2, prefilling=True) == []  # newcomers wait for it
    assert scheduler.remove(third) == 1 and scheduler.remove(third) == 0
    assert seen == [2, 4, 0, 1, 0]
    scheduler.submit(job_of(1))
    assert len(scheduler.close()) == 1
    with pytest.raises(EngineError) as closed:
        scheduler.submit(job_of(1))
    assert closed.value.kind == "closed"
    assert scheduler.next_jobs(busy_rows=1, prefilling=False) == []  # running rows finish
    assert scheduler.next_jobs(busy_rows=0, prefilling=False) is None
    other = Scheduler(SmallestFirst(), gather_s=0.0)
    jobs = [job_of(3), job_of(1), job_of(2)]
    for job in jobs:
        other.submit(job)
    assert other.next_jobs(busy_rows=0, prefilling=False) == [jobs[1]]
    assert other.waiting_rows == 5


# -- detokenizer


def full_settled(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text[: len(text.rstrip("\ufffd"))]


class SlowView:
    """A real tokenizer seen as a slow one (no Rust backend): the Python window path. It records
    how many ids each decode call gets."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def sequences(tokenizer, rng: random.Random) -> list[list[int]]:
    """Real tokenizer output (multi-byte characters split over byte tokens), and random ids,
    which leave characters unfinished and bytes invalid as a random model's output does."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    noise = [[rng.randrange(len(tokenizer)) for _ in range(60)] for _ in range(20)]
    return encoded + noise + [ids + noise[0][:10] + ids for ids in encoded]


def tokenizers_under_test(tiny_tokenizer):
    from transformers import AutoTokenizer

    found = [tiny_tokenizer]
    if (REAL_TOKENIZER / "tokenizer.json").exists():
        found.append(AutoTokenizer.from_pretrained(REAL_TOKENIZER))
    return found


def test_incremental_text_is_the_full_decode_at_every_token(tiny_tokenizer):
    rng = random.Random(0)
    for tokenizer in tokenizers_under_test(tiny_tokenizer):
        for ids in sequences(tokenizer, rng):
            fast, slow = (
                IncrementalDetokenizer(tokenizer),
                IncrementalDetokenizer(SlowView(tokenizer)),
            )
            assert fast._stream is not None and slow._stream is None
            pieces = []
            for k, token in enumerate(ids):
                pieces.append(fast.push(token))
                slow.push(token)
                expected = full_settled(tokenizer, ids[: k + 1])
                assert fast.text == slow.text == expected, (k, ids)
                assert fast.length == len(expected)
            assert "".join(pieces) == fast.text


def test_window_decoding_stays_a_few_tokens_wide(tiny_tokenizer):
    view = SlowView(tiny_tokenizer)
    decoder = IncrementalDetokenizer(view)
    ids = tiny_tokenizer(" ".join(TEXTS) * 20, add_special_tokens=False)["input_ids"]
    assert len(ids) > 500
    for token in ids:
        decoder.push(token)
    assert decoder.text == full_settled(tiny_tokenizer, ids)
    assert max(view.lengths) <= 8  # O(1) a token: never the whole output


def old_stream(tokenizer, ids: list[int], stops: tuple[str, ...]):
    """The engine's previous algorithm, verbatim in effect: decode everything at each token,
    search stops from ``search_from``, hold back a possible stop start. Per token: (delta, stop)."""
    out, emitted, search_from = [], 0, 0
    for k in range(len(ids)):
        text = tokenizer.decode(
            ids[: k + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        settled = len(text.rstrip("\ufffd"))
        hits = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
        if hits:
            out.append(("", min(hits)))
            return out
        search_from = max(0, settled - max(map(len, stops), default=0) + 1)
        safe = settled - held_back(text[:settled], stops)
        out.append((text[emitted:safe] if safe > emitted else "", None))
        emitted = max(emitted, safe)
    return out


def new_stream(tokenizer, ids: list[int], stops: tuple[str, ...]):
    stream, out = TextStream(tokenizer, stops), []
    for token in ids:
        stop_at = stream.push(token)
        out.append(("", stop_at) if stop_at is not None else (stream.take_safe(), None))
        if stop_at is not None:
            break
    return out


def test_stops_and_hold_back_are_those_of_the_full_decode(tiny_tokenizer):
    rng = random.Random(1)
    for tokenizer in tokenizers_under_test(tiny_tokenizer):
        for text in TEXTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            stops_tried = [(), ("\x00never",), ("done", "ok😀"), ("は!",), ("😀",), ("e  ",)]
            for _ in range(25):  # substrings: across tokens, inside split characters, repeats
                start = rng.randrange(len(text) - 1)
                stops_tried.append((text[start : start + rng.randint(1, 5)], "\x00x"))
            for stops in stops_tried:
                assert new_stream(tokenizer, ids, stops) == old_stream(tokenizer, ids, stops), (
                    text,
                    stops,
                )
        for ids in sequences(tokenizer, rng):  # bytes that never form a character: U+FFFD
            text = tokenizer.decode(ids, skip_special_tokens=True)
            for stops in [("\ufffd",), ("\ufffd\ufffd",), ("a\ufffd", "\x00")]:
                stops += (text[len(text) // 2 : len(text) // 2 + 3],)
                assert new_stream(tokenizer, ids, stops) == old_stream(tokenizer, ids, stops)


# -- output processor: a tokenizer, no model


def outputs(tokenizer) -> OutputProcessor:
    return OutputProcessor(
        tokenizer, {tokenizer.eos_token_id}, EngineMetrics(), "m", ResponseCache(0)
    )


def drain(job: Job) -> list:
    events = []
    while not job.events.empty():
        events.append(job.events.get())
    return events


def test_output_processor_streams_safe_text_and_ends_rows(tiny_tokenizer):
    text = "Return the value of the key, or None."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    processor = outputs(tiny_tokenizer)
    job = job_of(2, stream=True, max_tokens=100, stop=("key,",))
    stopped, eos_row = job.rows
    for row in job.rows:
        row.text_stream = TextStream(tiny_tokenizer, row.params.stop, stream=True)
        row.max_tokens = 100
    for token in ids:
        if processor.append(stopped, token, time.perf_counter()):
            break
    events = drain(job)
    deltas = "".join(e.text for e in events if isinstance(e, Delta))
    assert deltas == "Return the value of the " and "k" not in deltas
    assert events[-1] == Finished(
        0, "Return the value of the ", "stop", 0, stopped.completion_tokens
    )
    assert stopped.status is RequestStatus.FINISHED
    assert stopped.completion_tokens < len(ids)  # it stopped as the stop string completed
    for token in ids[:3]:
        assert not processor.append(eos_row, token, time.perf_counter())
    assert processor.append(eos_row, tiny_tokenizer.eos_token_id, time.perf_counter())
    finished = drain(job)[-1]
    assert (finished.reason, finished.text) == ("stop", tiny_tokenizer.decode(ids[:3]))
    assert finished.completion_tokens == 4  # EOS counts, as before
    with pytest.raises(RuntimeError, match="already finished"):
        eos_row.move(RequestStatus.DECODING)
    limited = job_of(1, max_tokens=2).rows[0]
    limited.max_tokens = 2
    assert not processor.append(limited, ids[0], 0.0) and processor.append(limited, ids[1], 0.0)
    assert drain(limited.job)[-1].reason == "length"


# -- the engine: request states, no cache-keyword warning, seeds


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = Engine(
        ModelSpec("m", str(tiny_model_dir), batch_wait_ms=0), EngineMetrics(), ResponseCache(0)
    )
    e.start()
    assert e.loaded.wait(120) and e.ready, e.load_error
    yield e
    e.close()


def test_request_states_through_the_engine(engine):
    good = job_of(2, max_tokens=3, temperature=0, ignore_eos=True)
    assert all(r.status is RequestStatus.WAITING for r in good.rows)
    engine.submit(good)
    assert len(engine.results(good)) == 2
    assert [r.status for r in good.rows] == [RequestStatus.FINISHED] * 2
    too_long = job_of(1, max_tokens=100_000)
    engine.submit(too_long)
    with pytest.raises(EngineError, match="context length"):
        engine.results(too_long)
    assert too_long.rows[0].status is RequestStatus.FAILED
    long = job_of(1, stream=True, max_tokens=200, temperature=0, ignore_eos=True)
    engine.submit(long)
    while not isinstance(long.events.get(timeout=60), Delta):
        pass
    assert long.rows[0].status is RequestStatus.DECODING
    engine.cancel(long)
    deadline = time.monotonic() + 60
    while long.rows[0].status is not RequestStatus.ABORTED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert long.rows[0].status is RequestStatus.ABORTED


def test_generation_passes_the_cache_under_its_new_name(tiny_model_dir, engine):
    """transformers 5.24 warns that forward's ``past_key_values`` goes in 5.40 (use ``cache``)."""
    from transformers import AutoModelForCausalLM

    from lmref.serving.batching import Prefill, PrefixCache, RunningBatch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefix = PrefixCache(model, min_tokens=2)
        prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 10, 11]]
        Prefill(model, prompts[:1], 0, prefix=prefix)
        prefill = Prefill(model, prompts, 0, chunk_tokens=2, prefix=prefix)
        assert prefill.shared == 4  # the prefix cache ran a forward of its own
        while prefill.step() is None:
            pass
        batch = RunningBatch(model)
        batch.join(prefill)
        batch.step([12, 13])
        job = job_of(2, stream=True, max_tokens=5, temperature=0.8, seed=3, stop=("zz",))
        engine.submit(job)
        engine.results(job)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "past_key_values" in m], messages


def test_a_seeded_row_writes_the_same_alone_and_batched(engine):
    def seeded(job: Job) -> None:
        job.add_row("The object", SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7))

    alone = Job("m", stream=False)
    seeded(alone)
    engine.submit(alone)
    expected = engine.results(alone)[0].text
    crowd = Job("m", stream=True)
    crowd.add_row("x", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    crowd.add_row("y", SamplingParams(max_tokens=15, temperature=1.3, seed=1, ignore_eos=True))
    seeded(crowd)
    engine.submit(crowd)
    events = list(engine.events(crowd))
    assert not [e for e in events if isinstance(e, Failed)]
    finished = {e.index: e for e in events if isinstance(e, Finished)}
    assert finished[2].text == expected
    for index, done in finished.items():  # streamed pieces join to the final text
        assert "".join(e.text for e in events if isinstance(e, Delta) and e.index == index) == (
            done.text
        )
