"""The evaluation lesson's parts without a server: bits per byte against a hand computation and
its strided windows, the judge's swap logic, contamination planted and found, and the A/B and
bootstrap statistics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmref.core.stats import Score, bootstrap_interval, two_proportion_test
from lmref.evaluation.bits_per_byte import bits_per_byte, document_nll
from lmref.evaluation.contamination import contamination_report, word_ngrams
from lmref.evaluation.judge import Pair, judge_pairs, logprob_verdicts, make_pairs

pytestmark = pytest.mark.unit

DOCS = ["Return the sorted list.", "Ünïcödé bytes count twice: é, ü.", "x = 1\n" * 30]


class Uniform(torch.nn.Module):
    """A 'model' that gives every next token probability 1/V: its NLL per token is ln V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(vocab), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.weight.expand(*input_ids.shape, -1))


def test_bits_per_byte_of_a_uniform_model_is_tokens_times_log2_vocab_over_bytes(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    result = bits_per_byte(Uniform(vocab), tiny_tokenizer, DOCS, max_length=16, stride=8)
    tokens = [len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    nbytes = [len(d.encode("utf-8")) for d in DOCS]
    assert nbytes[1] > len(DOCS[1])  # UTF-8 bytes, not characters
    # By hand: every token (the first too, after BOS) costs log2(V) bits, long document included.
    assert result.tokens == sum(tokens)
    assert result.value == pytest.approx(sum(tokens) * math.log2(vocab) / sum(nbytes), rel=1e-9)
    low, high = result.interval
    assert low <= result.value <= high and low < high
    assert "bits/byte" in str(result)


def test_strided_windows_score_every_token_once_and_more_context_helps(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tokenizer.bos_token_id] + tokenizer(DOCS[2], add_special_tokens=False)["input_ids"]
    assert len(ids) > 40
    whole, n_whole = document_nll(model, ids, max_length=256, stride=128)  # one window
    for length, stride in ((16, 8), (16, 15), (40, 1)):
        nll, n = document_nll(model, ids, max_length=length, stride=stride)
        assert n == n_whole == len(ids) - 1
    # One window of a single-window document is the plain full-context NLL.
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    direct = -torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum()
    assert whole == pytest.approx(float(direct), rel=1e-9)
    with pytest.raises(ValueError, match="stride < max_length"):
        document_nll(model, ids, max_length=16, stride=16)


def test_judge_swap_logic_measures_position_bias():
    pairs = [Pair("q1", "right1", "wrong1"), Pair("q2", "right2", "wrong2")]
    # Always "A": follows position, agrees with exact match half the time, never consistent.
    always_a = judge_pairs(pairs, lambda prompt: (0.0, -1.0))
    assert (always_a.says_a.value, always_a.consistency.value, always_a.agreement.value) == (
        1.0,
        0.0,
        0.5,
    )
    # A judge that finds the right answer wherever it stands: consistent, unbiased, agrees.
    oracle = judge_pairs(pairs, lambda p: (0.0, -1.0) if "A: right" in p else (-1.0, 0.0))
    assert (oracle.says_a.value, oracle.consistency.value, oracle.agreement.value) == (
        0.5,
        1.0,
        1.0,
    )
    assert oracle.correct_first == ("A", "A") and oracle.correct_second == ("B", "B")
    rows = [{"task": "t", "instruction": f"i{k}", "answer": f"a{k}"} for k in range(3)] + [
        {"task": "u", "instruction": "j", "answer": "b"}
    ]
    with pytest.raises(ValueError, match="no other answer"):
        make_pairs(rows)
    made = make_pairs(rows[:3])
    assert all(p.wrong != p.correct and p.wrong.startswith("a") for p in made)


def test_judge_reads_letters_from_a_real_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    verdict = logprob_verdicts(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    log_a, log_b = verdict("Question: 1+1?\nAnswer A: 2\nAnswer B: 3\nWhich?")
    assert log_a < 0 and log_b < 0 and log_a != log_b
    assert verdict("same prompt") == verdict("same prompt")  # deterministic


def test_contamination_flags_planted_items_and_not_clean_ones():
    items = [
        "Write the date 1987-03-14 in words. 14 March 1987",
        "Reverse the order of the words: file list string value. value string list file",
        "Sort the words alphabetically: honey jam apple. apple honey jam",
        "What is 42 plus 7? 49",
    ]
    training = [
        "Some unrelated text about Python modules and their docstrings, long enough to matter.",
        # items 0 and 3 planted, in other case and punctuation, inside other text
        "prefix WRITE THE DATE 1987-03-14 in words: 14 march 1987 suffix",
        "noise what is 42 plus 7 49 noise",
        "Sort the words alphabetically: rice salt milk. milk rice salt",  # same template only
    ]
    report = contamination_report(items, training, n=8)
    assert [i.flagged for i in report.items] == [True, False, False, True]
    assert report.items[0].ratio == 1.0 and report.items[2].ratio < 0.5
    assert report.score == Score(2, 4) and report.clean_indices == [1, 2]
    assert len(word_ngrams("one two three", 8)) == 1  # shorter than n: the whole item
    with pytest.raises(ValueError, match="threshold"):
        contamination_report(items, training, threshold=0)


def test_two_proportion_test_is_fishers_exact():
    # Fisher's exact two-sided p for [[3, 1], [1, 3]] is 0.486 (the classic tea-tasting table).
    assert two_proportion_test(Score(3, 4), Score(1, 4)) == pytest.approx(0.4857, abs=1e-4)
    assert two_proportion_test(Score(282, 500), Score(293, 500)) > 0.05
    assert two_proportion_test(Score(10, 100), Score(30, 100)) < 0.01
    assert two_proportion_test(Score(5, 10), Score(5, 10)) == pytest.approx(1.0)


def test_bootstrap_interval_is_seeded_and_covers_the_statistic():
    rng = np.random.default_rng(1)
    values = rng.normal(5.0, 1.0, size=200)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and high - low < 0.5  # about 2 * 1.96 / sqrt(200) = 0.28
    assert bootstrap_interval(values) == (low, high)  # same seed, same interval
    bits, nbytes = [10.0, 20.0, 30.0], [10, 10, 10]
    low, high = bootstrap_interval([bits, nbytes], lambda b, y: b.sum(-1) / y.sum(-1))
    assert 1.0 <= low <= 2.0 <= high <= 3.0
    with pytest.raises(ValueError, match="one length"):
        bootstrap_interval([[1.0, 2.0], [1.0]])
