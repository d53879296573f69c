"""lmref.serving.sampler on its own: token choice per row (batched: greedy is the argmax, seeded rows
repeat whatever shares the batch, frequencies and top-p follow the probabilities) and the
log-probabilities it reports, against torch computed here on the conftest's tiny Llama and BPE."""

from __future__ import annotations

import pytest
import torch

from lmref.serving.sampler import (
    SamplingRows,
    TokenPieces,
    reported,
    sample,
    score_prompt,
    step_logprobs,
    uniform,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()


def rows_of(temperatures, top_ps, seeds, steps=None) -> SamplingRows:
    return SamplingRows.of(list(temperatures), list(top_ps), list(seeds), steps)


def test_greedy_rows_take_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    tokens = sample(logits, rows_of([0.0, 1e-6, 0.0, 0.0], [1.0, 1.0, 0.5, 1.0], [1, 2, 3, 4]))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    mixed = sample(logits, rows_of([0.0, 1.0, 0.0, 0.7], [1.0, 0.9, 1.0, 1.0], [0, 5, 0, 6]))
    assert mixed[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()
    # Ties go to the first largest, as argmax's do (a vocabulary-wide row, as served)
    tied = torch.zeros(3, 49152)
    tied[0, [9, 40000]] = 2.0
    tied[1, [30000, 30001, 5]] = 1.0
    greedy = sample(tied, rows_of([0.0] * 3, [1.0] * 3, [0] * 3))
    assert greedy.tolist() == tied.argmax(-1).tolist() == [9, 5, 0]


def test_seeded_rows_give_the_same_tokens_alone_and_in_any_batch():
    """A row's draws are a function of its seed and its token index only, so its tokens do not
    depend on its neighbours, their settings, or where in the batch it sits."""
    torch.manual_seed(1)
    steps = [torch.randn(6, 300) for _ in range(8)]  # a row's logits at 8 decode steps
    alone = rows_of([0.9], [0.8], [1234])
    expected = [int(sample(logits[2:3], alone)[0]) for logits in steps]
    assert len(set(expected)) > 1  # it samples, not just the argmax
    batched = rows_of([0.0, 1.3, 0.9, 0.5, 1.0, 0.9], [1.0, 0.5, 0.8, 1.0, 0.95, 0.8],
                      [7, 99, 1234, 3, 11, 4321])  # fmt: skip
    got = [int(sample(logits, batched)[2]) for logits in steps]
    assert got == expected
    # The same row, at the end of a batch built by leaving and joining, from its 4th token on.
    later = (
        rows_of([1.0, 0.9], [1.0, 0.8], [5, 1234], [0, 4])
        .select([1])
        .cat(rows_of([0.3], [1.0], [8]))
    )
    assert [int(sample(logits[[2, 0]], later)[0]) for logits in steps[4:]] == expected[4:]


def test_sampled_frequencies_follow_the_probabilities():
    """Many seeds, one distribution: counts within 5 standard deviations of n * p."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    n = 20000
    logits = probs.log().expand(n, -1)
    counts = torch.bincount(sample(logits, rows_of([1.0] * n, [1.0] * n, range(n))), minlength=5)
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() < 5 * sigma).all(), counts
    # Temperature 0.5 squares the probabilities (renormalised).
    sharp = probs**2 / (probs**2).sum()
    counts = torch.bincount(sample(logits, rows_of([0.5] * n, [1.0] * n, range(n))), minlength=5)
    assert ((counts - n * sharp).abs() < 5 * (n * sharp * (1 - sharp)).sqrt() + 1).all(), counts


def test_top_p_keeps_only_the_nucleus_in_proportion():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    n = 20000
    logits = probs.log().expand(n, -1)
    # top_p 0.7: 0.5 < 0.7, so the second token is needed; the mass before the third is 0.8.
    counts = torch.bincount(sample(logits, rows_of([1.0] * n, [0.7] * n, range(n))), minlength=5)
    assert counts[2:].sum() == 0
    share = counts[0] / counts[:2].sum()
    assert abs(share - 0.5 / 0.8) < 0.02, share
    one = sample(logits[:50], rows_of([1.0] * 50, [0.4] * 50, range(50)))
    assert one.tolist() == [0] * 50  # the likeliest token alone holds more than 0.4
    close = torch.tensor([[4.0, 3.9, -5.0, -5.0, -6.0]])
    picks = {int(sample(close, rows_of([1.0], [0.9], [s]))[0]) for s in range(60)}
    assert picks == {0, 1}


def test_uniforms_depend_on_seed_and_step_only():
    seeds = torch.tensor([0, 1, 2**62 + 5, 2**63 - 1])
    steps = torch.tensor([0, 0, 3, 7])
    u = uniform(seeds, steps)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 4
    assert uniform(seeds[2:3], steps[2:3]).item() == u[2].item()
    many = uniform(torch.full((50000,), 42), torch.arange(50000))
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.var() - 1 / 12) < 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sampling_on_a_gpu_never_synchronizes_and_matches_the_cpu():
    torch.manual_seed(2)
    logits = torch.randn(8, 1000)
    args = ([0.0, 1.0, 0.7, 1.2] * 2, [1.0, 0.9, 1.0, 0.5] * 2, range(8))
    expected = sample(logits, rows_of(*args)).tolist()
    rows = SamplingRows.of(*map(list, args), device="cuda")
    on_gpu = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(on_gpu, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.tolist() == expected


def test_step_logprobs_are_the_raw_log_softmax(tiny_tokenizer):
    torch.manual_seed(1)
    logits = torch.randn(2, len(tiny_tokenizer))
    pieces = TokenPieces(tiny_tokenizer)
    entries = step_logprobs(logits, [5, 9], [3, 0], pieces)
    reference = torch.log_softmax(logits, -1)
    assert entries[0].logprob == pytest.approx(float(reference[0, 5]), abs=1e-6)
    assert entries[1].logprob == pytest.approx(float(reference[1, 9]), abs=1e-6)
    values, ids = reference[0].topk(3)
    assert [t.logprob for t in entries[0].top] == pytest.approx(values.tolist(), abs=1e-6)
    assert [bytes(t.bytes).decode("utf-8", "replace") for t in entries[0].top] == [
        tiny_tokenizer.decode([i]) for i in ids.tolist()
    ]
    assert entries[1].top == ()


def test_score_prompt_gives_each_token_given_the_ones_before(model, tiny_tokenizer):
    ids = tiny_tokenizer("Return the sorted list of items")["input_ids"]
    scored = score_prompt(model, ids, 2, TokenPieces(tiny_tokenizer))
    assert len(scored) == len(ids) and scored[0].logprob is None and scored[0].token_id == ids[0]
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    for i in range(1, len(ids)):
        assert scored[i].logprob == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-5)
        assert len(scored[i].top) == 2


def test_pieces_keep_the_bytes_of_split_characters(tiny_tokenizer):
    pieces = TokenPieces(tiny_tokenizer)
    text = "a 😀 は"
    ids = tiny_tokenizer(text)["input_ids"]
    spelled = [pieces(i) for i in ids]
    assert bytes(b for _, data in spelled for b in data).decode() == text
    assert any(t.startswith("bytes:\\x") for t, _ in spelled)
    eos = tiny_tokenizer.eos_token_id
    assert pieces(eos)[0] == tiny_tokenizer.eos_token  # a special token is its own text


def test_reported_counts_tokens_starting_before_the_cut():
    starts = [0, 3, 3, 7, 10]
    assert [reported(starts, n) for n in (0, 1, 3, 4, 7, 11)] == [0, 1, 1, 3, 3, 5]


def test_penalties_and_logit_bias_adjust_only_their_rows():
    """OpenAI's semantics, by hand: logit - presence * (count > 0) - frequency * count + bias;
    rows without them sample exactly as without the adjustment, in a mixed batch that joins
    and leaves."""
    from lmref.serving.penalties import LogitAdjust, adjust_of
    from lmref.serving.penalties import sample as adjusted_sample
    from lmref.serving.request import SamplingParams

    torch.manual_seed(0)
    vocab = 12
    logits = torch.randn(3, vocab)
    params = [
        SamplingParams(),
        SamplingParams(presence_penalty=0.5, frequency_penalty=1.5, logit_bias=((3, 7.0),)),
        SamplingParams(logit_bias=((0, -100.0), (1, 2.5))),
    ]
    adjust = adjust_of(params, vocab)
    assert adjust_of([SamplingParams()], vocab) is None  # nothing to do: no tensors at all
    adjust.observe(torch.tensor([4, 4, 5]))
    adjust.observe(torch.tensor([4, 4, 4]))
    hand = logits.clone()
    hand[1, 4] -= 0.5 + 1.5 * 2
    hand[1, 3] += 7.0
    hand[2, 0] -= 100.0
    hand[2, 1] += 2.5
    assert torch.equal(adjust.apply(logits), hand)  # row 0 untouched, though it has counts

    rows = rows_of([0.0, 0.0, 0.0], [1.0] * 3, [0, 0, 0])
    rows.adjust = adjust_of(params, vocab)
    rows.adjust.bias[1, 7] = 1000.0  # make row 1's greedy pick known, then penalise it
    first = adjusted_sample(logits, rows).tolist()
    assert first[0] == int(logits[0].argmax()) and first[1] == 7
    assert rows.adjust.counts[1, 7] == 1
    # Leaving and joining keep each row's own counts and settings.
    kept = rows.select([1])
    assert torch.equal(kept.adjust.counts[0], rows.adjust.counts[1])
    joined = kept.cat(rows_of([0.0], [1.0], [0]))
    assert joined.adjust.active == (True, False) and joined.adjust.counts.shape == (2, vocab)
    assert rows.select([0]).adjust is None  # only plain rows left: back to no adjustment
    assert LogitAdjust.cat(None, 1, None, 2) is None
