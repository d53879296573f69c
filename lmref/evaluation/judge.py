"""An LLM as a pairwise judge ("which answer is correct, A or B?"), and its failure modes measured.

The verdict is read from the judge's next-token log-probabilities of "A" and "B" after the
question, not from free generation: one forward pass per verdict, deterministic, and never an
unparseable reply. Each pair (a reference-correct answer and a wrong one) is judged twice, once
in each order, which measures what a judge score hides:

- position bias: the share of all verdicts that say "A" (0.5 for an unbiased judge) and the
  consistency rate (pairs whose two verdicts pick the same *answer*, not the same letter);
- agreement with exact match: the share of verdicts that pick the answer exact match calls
  correct (on pairs built from exactly checkable tasks, the judge's accuracy).

A small judge (SmolLM2-135M) mostly follows position: the report says so with intervals.

In-process (fast): ``logprob_verdicts(model, tokenizer)``. Against a served model, the same
verdict is one request per prompt to lmref's ``/v1/completions`` with ``max_tokens: 1, logprobs:
20, temperature: 0`` (or chat ``logprobs: true, top_logprobs: 20``), reading the log-probabilities
of "A" and "B" from ``top_logprobs[0]`` (-inf where absent); pass that as the ``verdict``
function.

Usage::

    from lmref.evaluation.judge import judge_pairs, logprob_verdicts, make_pairs

    pairs = make_pairs(test_rows)                   # rows with task, instruction, answer
    report = judge_pairs(pairs, logprob_verdicts(model, tokenizer))
    print(report.agreement, report.consistency, report.says_a)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmref.core.stats import Score

QUESTION = (
    "Question: {question}\nAnswer A: {a}\nAnswer B: {b}\n"
    "Which answer is correct? Reply with the letter A or B only."
)
# The scorer of one prompt: (log p("A"), log p("B")) for the judge's next token.
Verdict = Callable[[str], tuple[float, float]]


@dataclass(frozen=True)
class Pair:
    """A question, its correct answer and a wrong one (as exact match sees them)."""

    question: str
    correct: str
    wrong: str


def make_pairs(rows: Sequence[dict], seed: int = 0) -> list[Pair]:
    """A pair per row (``instruction``, ``answer``, optional ``task``): the wrong answer is another
    row's answer of the same task, so it has the right form and only its content is wrong."""
    rng = random.Random(seed)
    pairs = []
    for i, row in enumerate(rows):
        others = [
            r["answer"]
            for j, r in enumerate(rows)
            if j != i and r.get("task") == row.get("task") and r["answer"] != row["answer"]
        ]
        if not others:
            raise ValueError(f"row {i} (task {row.get('task')!r}) has no other answer to pair with")
        pairs.append(Pair(row["instruction"], row["answer"], rng.choice(others)))
    return pairs


@dataclass(frozen=True)
class JudgeReport:
    """Verdicts per pair in both orders and the measures built from them."""

    pairs: tuple[Pair, ...]
    correct_first: tuple[str, ...]  # verdict letter with the correct answer as A
    correct_second: tuple[str, ...]  # verdict letter with the correct answer as B

    @property
    def agreement(self) -> Score:
        """Verdicts (both orders) that pick the answer exact match calls correct."""
        hits = sum(v == "A" for v in self.correct_first) + sum(
            v == "B" for v in self.correct_second
        )
        return Score(hits, 2 * len(self.pairs))

    @property
    def consistency(self) -> Score:
        """Pairs whose two verdicts pick the same answer (letters differ once swapped)."""
        same = sum(a != b for a, b in zip(self.correct_first, self.correct_second))
        return Score(same, len(self.pairs))

    @property
    def says_a(self) -> Score:
        """Share of all verdicts that are "A": position bias is its distance from 50%."""
        return Score(
            sum(v == "A" for v in self.correct_first + self.correct_second), 2 * len(self.pairs)
        )

    def summary(self) -> dict[str, str]:
        return {
            "agreement with exact match": str(self.agreement),
            "consistency under swap": str(self.consistency),
            "verdicts that say A": str(self.says_a),
        }


def judge_pairs(pairs: Sequence[Pair], verdict: Verdict, template: str = QUESTION) -> JudgeReport:
    """Judge every pair in both orders with ``verdict`` (see :func:`logprob_verdicts`)."""
    if not pairs:
        raise ValueError("no pairs to judge")

    def letter(question: str, a: str, b: str) -> str:
        log_a, log_b = verdict(template.format(question=question, a=a, b=b))
        return "A" if log_a >= log_b else "B"  # a tie goes to A: counted as position bias

    first = tuple(letter(p.question, p.correct, p.wrong) for p in pairs)
    second = tuple(letter(p.question, p.wrong, p.correct) for p in pairs)
    return JudgeReport(tuple(pairs), first, second)


def _letter_ids(tokenizer, letter: str) -> list[int]:
    """The single-token spellings of a letter ("A" and " A" where each is one token)."""
    ids = {
        tuple(tokenizer(form, add_special_tokens=False)["input_ids"])
        for form in (letter, " " + letter)
    }
    single = [i[0] for i in ids if len(i) == 1]
    if not single:
        raise ValueError(f"the tokenizer has no single token for {letter!r}; use another label")
    return single


def logprob_verdicts(model: torch.nn.Module, tokenizer) -> Verdict:
    """A verdict function from a causal LM in this process: the prompt goes through the
    tokenizer's chat template where it has one (an instruct model answers in its assistant
    turn), and the score of a letter is the log-sum-exp over its single-token spellings."""
    ids_a, ids_b = _letter_ids(tokenizer, "A"), _letter_ids(tokenizer, "B")
    device = next(model.parameters()).device
    model.eval()

    @torch.no_grad()
    def verdict(prompt: str) -> tuple[float, float]:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt + "\nAnswer:"
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
        return float(logprobs[ids_a].logsumexp(0)), float(logprobs[ids_b].logsumexp(0))

    return verdict
