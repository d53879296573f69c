"""The strict wording check of synthetic instructions (``synthetic_check.verify``): a candidate
must be a request (an instruction verb first, or a question) and carry its family's keyword, so
a statement that merely mentions the task is rejected even when its input parses and its
computed answer would be right."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lmref.data.instruction_tasks import TASK_SPECS, checked_example
from lmref.data.synthetic import (
    LEAD_VERBS,
    SEED_WORDINGS,
    SynthConfig,
    generate_synthetic,
    matched_control,
)
from lmref.data.synthetic_check import asks, verify

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("task", "instruction", "reason"),
    [
        ("digits", "The digits of 4875 are separated by a dash.", "not a request"),
        ("digits", "5308 in words.", "meaning lost"),  # a number name, not digit by digit
        ("date", "1968-12-27 as a date written in words.", "not a request"),
        ("time", "02:59 to 12-hour time: 12-hour time.", "not a request"),
        ("time", "What is 02:59 in 12-hour time.", "not a request"),  # a question needs its "?"
    ],
)
def test_statements_fragments_and_keywordless_wordings_are_rejected(task, instruction, reason):
    verdict = verify(task, instruction, None, TASK_SPECS)
    assert not verdict.accepted and verdict.reason == reason, verdict


def test_the_same_inputs_worded_as_requests_are_accepted_with_the_computed_answer():
    for task, instruction, answer in [
        ("digits", "Please write each digit of 4875 as a word.", "four eight seven five"),
        ("digits", "Can you name the digits of 4875?", "four eight seven five"),
        ("time", "What is 02:59 on a 12-hour clock?", "2:59 am"),
        ("date", "Give 1968-12-27 as a date written in words.", "27 December 1968"),
    ]:
        verdict = verify(task, instruction, None, TASK_SPECS)
        assert verdict.accepted and verdict.answer == answer, (instruction, verdict)


def test_every_seed_wording_and_lead_verb_passes_the_strict_check():
    rng = random.Random(0)
    for task in SynthConfig().tasks:
        for n, wording in enumerate(SEED_WORDINGS[task]):
            template, _ = checked_example(task, TASK_SPECS[task], rng, n, "TASK_SPECS")
            spec_prefix = TASK_SPECS[task]["template"].split("{")[0]
            spec_suffix = TASK_SPECS[task]["template"].split("}")[1]
            x = template[len(spec_prefix) : len(template) - len(spec_suffix)]
            verdict = verify(task, wording.format(x=x), None, TASK_SPECS)
            assert verdict.accepted or verdict.reason == "answer copied", (wording, verdict)
        for lead in LEAD_VERBS[task]:
            assert asks(f"{lead} it?") and (
                asks(f"{lead} it.") or lead.split()[0] in {"How", "What"}
            )


def test_an_unknown_prompt_style_is_refused_before_any_request():
    raw = {"train": [], "validation": [], "test": []}
    with pytest.raises(ValueError, match="unknown prompt 'chat'"):
        generate_synthetic(None, "m", raw, SynthConfig(prompt="chat"))


def test_the_matched_control_has_the_synthetic_counts_per_task_and_skips_the_seed_rows():
    train = [
        {"task": t, "instruction": f"{t} {i}", "answer": str(i)} for i in range(6) for t in "ab"
    ]
    synthetic = [{"task": "a"}, {"task": "a"}, {"task": "b"}]
    control = matched_control(train, synthetic, skip=4)  # rows 0-3 are the seed items
    assert Counter(r["task"] for r in control) == {"a": 2, "b": 1}
    assert all(r in train[4:] for r in control) and len({r["instruction"] for r in control}) == 3
    with pytest.raises(ValueError, match=r"too short for the control arm: missing \{'a': 1\}"):
        matched_control(train, [{"task": "a"}] * 5, skip=4)
