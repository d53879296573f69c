"""lmref.serving.sampler on its own: token choice per row and the log-probabilities it reports, against
torch computed here on the conftest's tiny Llama and BPE."""

from __future__ import annotations

import pytest
import torch

from lmref.serving.sampler import TokenPieces, reported, sample, score_prompt, step_logprobs


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    generators = [None, torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    tokens = sample(logits, [0.0, 1.0, 1.0], [1.0, 0.9, 0.9], generators)
    assert tokens[0] == int(logits[0].argmax())
    again = sample(logits[1:2], [1.0], [0.9], [torch.Generator().manual_seed(7)])
    assert again[0] == tokens[1]  # same seed, same row: same token, whatever else was batched


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[4.0, 3.9, -5.0, -5.0, -6.0]])
    probs = torch.softmax(logits[0], -1)
    assert probs[:2].sum() > 0.99
    picks = {sample(logits, [1.0], [0.9], [torch.Generator().manual_seed(s)])[0] for s in range(60)}
    assert picks == {0, 1}


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
