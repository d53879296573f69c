"""Synthetic instruction data: the real model (SmolLM2-135M-Instruct behind ``lmref.serve``)
writes wordings, the verifier keeps correct items only, leakage and counts are checked."""

from __future__ import annotations

import datetime
import random
import re

import pytest

from lmref.data.instruction_tasks import TASK_SPECS, checked_example
from lmref.data.instructions import InstructionConfig, make_instruction_dataset
from lmref.data.synthetic_check import HeldOut, verify

pytestmark = pytest.mark.integration

REAL_MODEL = "artifacts/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def raw():
    config = InstructionConfig(train_per_task=30, validation_per_task=10, test_per_task=10)
    return make_instruction_dataset(config)[0]


def _oracle(task: str, instruction: str) -> str:
    """The answer by the standard library, independent of lmref's checker."""
    if task == "time":
        t = datetime.datetime.strptime(re.search(r"\d\d:\d\d", instruction)[0], "%H:%M")
        return f"{int(t.strftime('%I'))}:{t:%M} {t:%p}".lower()
    d = datetime.date.fromisoformat(re.search(r"\d{4}-\d\d-\d\d", instruction)[0])
    return f"{d.day} {d:%B} {d.year}"


def test_the_verifier_agrees_with_the_task_generator_and_rejects_a_planted_wrong_answer():
    rng = random.Random(1)
    for task, spec in TASK_SPECS.items():
        for n in range(40):
            instruction, answer = checked_example(task, spec, rng, n, "TASK_SPECS")
            verdict = verify(task, instruction, answer, TASK_SPECS)
            if verdict.reason == "answer copied":  # the instruction set skips these too
                continue
            assert verdict.accepted and verdict.answer == answer, (task, instruction, verdict)
            wrong = answer + "x" if task != "add" else str(int(answer) + 1)
            assert verify(task, instruction, wrong, TASK_SPECS).reason == "wrong answer"
    assert verify("add", "How much is 41 plus 7?", "47", TASK_SPECS).reason == "wrong answer"
    assert verify("sort", "Reverse the words: milk rice jam", None, TASK_SPECS).reason == (
        "meaning lost"
    )
    assert not verify("time", "Write 25:61 in 12-hour time.", None, TASK_SPECS).accepted


def test_leakage_check_rejects_a_test_item_its_rewording_and_its_ngrams(raw):
    held_out = HeldOut.of(raw["validation"], raw["test"])
    item = next(r for r in raw["test"] if r["task"] == "date")
    verdict = verify("date", item["instruction"], None, TASK_SPECS)
    assert held_out.leak(item["instruction"], verdict.key) == "exact"
    iso = re.search(r"\d{4}-\d\d-\d\d", item["instruction"])[0]
    reworded = f"How is {iso} said in words?"
    assert held_out.leak(reworded, verify("date", reworded, None, TASK_SPECS).key) == "input"
    assert held_out.leak(reworded) == "n-gram"  # no parsed key: the rare n-gram still finds it
    clean = "How is 1066-10-14 said in words?"
    assert held_out.leak(clean, verify("date", clean, None, TASK_SPECS).key) is None


def test_the_real_model_writes_wordings_and_only_verified_items_are_kept(raw):
    from openai import OpenAI

    from lmref.data.synthetic import SynthConfig, generate_synthetic
    from lmref.lab.servers import start_replica
    from lmref.lab.services import Services

    held_out = HeldOut.of(raw["validation"], raw["test"])
    config = SynthConfig(tasks=("date", "time"), candidates_per_task=2, seed=3)
    with Services() as services:
        replica = services.add(
            start_replica(f"smollm2={REAL_MODEL}", ["--torch-threads", "1"], timeout=120)
        )
        client = OpenAI(base_url=replica.url + "/v1", api_key="-", max_retries=0, timeout=60)
        rows, report = generate_synthetic(client, "smollm2", raw, config)
        planted, planted_report = generate_synthetic(
            client,
            "smollm2",
            raw,
            SynthConfig(tasks=("time",), candidates_per_task=1, scheme="self-instruct", seed=3),
        )
    assert report.candidates == 4 == report.accepted + sum(report.rejected.values())
    assert sum(t["candidates"] for t in report.per_task.values()) == report.candidates
    assert sum(t["accepted"] for t in report.per_task.values()) == report.accepted == len(rows)
    for row in rows:  # correct by an independent oracle, new, and not an evaluation item
        assert row["answer"] == _oracle(row["task"], row["instruction"]), row
        assert held_out.leak(row["instruction"]) is None
    assert len({r["instruction"] for r in rows}) == len(rows)
    low, high = report.acceptance.interval
    assert low <= report.accepted / report.candidates <= high
    assert (
        planted_report.candidates
        == 1
        == planted_report.accepted + sum(planted_report.rejected.values())
    )
    for row in planted:
        assert row["answer"] == _oracle("time", row["instruction"])
