"""Tests for lmref.data.instructions: the task set, prompt masking, the collator, bad specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmref.data import instructions as instruction_data
from lmref.data.instructions import (
    IGNORE_INDEX,
    TASK_SPECS,
    InstructionCollator,
    InstructionConfig,
    format_prompt,
    make_instruction_dataset,
    tokenize_instructions,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def instructions():
    return make_instruction_dataset(InstructionConfig(train_per_task=200, test_per_task=20))


def test_instruction_dataset_splits_share_no_input(instructions):
    ds, stats = instructions
    tasks = InstructionConfig().tasks
    assert set(ds["train"]["task"]) == set(ds["validation"]["task"]) == set(tasks)
    assert set(ds["test"]["task"]) == set(tasks)
    assert len(ds["train"]) == 200 * len(tasks) and len(ds["test"]) == 20 * len(tasks)
    assert len(ds["validation"]) == 50 * len(tasks)
    splits = [set(ds[s]["instruction"]) for s in ("train", "validation", "test")]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert stats["shared_inputs"] == 0 and stats["validation"] == 50 * len(tasks)


def test_every_split_is_stratified_and_shuffled(instructions):
    # The first k * len(tasks) rows hold k of each task, so "evaluate on the first N" measures
    # every task (it once measured only `date`); the order within each round is random.
    ds, _ = instructions
    tasks = InstructionConfig().tasks
    for split in ("validation", "test"):
        column = ds[split]["task"]
        for k in (1, 3, 10):
            prefix = column[: k * len(tasks)]
            assert {t: prefix.count(t) for t in tasks} == dict.fromkeys(tasks, k), (split, k)
        rounds = [tuple(column[i : i + len(tasks)]) for i in range(0, 10 * len(tasks), len(tasks))]
        assert len(set(rounds)) > 1, f"{split}: every round in the same task order"
    assert ds["train"].column_names == ["task", "instruction", "answer"]


def test_instruction_answers_are_correct_transformations(instructions):
    ds, _ = instructions
    months = TASK_SPECS["date"]["months"]
    for row in ds["train"]:
        instruction, answer = row["instruction"], row["answer"]
        assert answer not in instruction  # never a copy of a span of the input
        words = instruction.split(": ")[-1].split()
        if row["task"] == "date":
            y, m, d = instruction.split()[3].split("-")
            assert answer == f"{int(d)} {months[int(m) - 1]} {y}"
        elif row["task"] == "sort":
            assert answer.split() == sorted(words)
        elif row["task"] == "uppercase":
            assert answer == " ".join(words).upper()
        elif row["task"] == "time":
            h, m = map(int, instruction.split()[1].split(":"))
            assert answer == f"{h % 12 or 12}:{m:02d} {'am' if h < 12 else 'pm'}"
        elif row["task"] == "digits":
            number = instruction.split()[-1].rstrip(".")
            names = TASK_SPECS["digits"]["names"]
            assert answer == " ".join(names[int(c)] for c in number)


def test_instruction_dataset_is_deterministic_and_checks_tasks(tmp_path):
    config = InstructionConfig(tasks=("reverse", "add"), train_per_task=30, test_per_task=5, seed=3)
    a, stats = make_instruction_dataset(config)
    b, _ = make_instruction_dataset(config)
    assert list(a["train"]["instruction"]) == list(b["train"]["instruction"])
    row = next(r for r in a["test"] if r["task"] == "reverse")
    assert row["answer"].split() == row["instruction"].split(": ")[1].split()[::-1]
    with pytest.raises(ValueError, match="unknown task"):
        make_instruction_dataset(InstructionConfig(tasks=("poetry",)))
    with pytest.raises(ValueError, match="distinct inputs"):
        make_instruction_dataset(InstructionConfig(tasks=("add",), test_per_task=900))
    specs = tmp_path / "tasks.json"
    specs.write_text(json.dumps({"add": {"template": "{a}+{b}=", "a": [1, 3], "b": [5, 5]}}))
    ds, stats = make_instruction_dataset(
        InstructionConfig(
            tasks=("add",), validation_per_task=1, test_per_task=1, task_specs_path=str(specs)
        )
    )
    answers = [a for split in ("train", "validation", "test") for a in ds[split]["answer"]]
    assert sorted(answers) == ["6", "7", "8"]
    assert stats["tasks"]["add"]["train"] == 1


def test_shipped_task_definitions_match_the_code():
    shipped = json.loads((REPO / "data" / "instruction_tasks.json").read_text())
    assert shipped == json.loads(json.dumps(TASK_SPECS))


def test_format_prompt():
    prompt = format_prompt("Sort the words alphabetically: b a")
    assert prompt == instruction_data.PROMPT_TEMPLATE.format(
        instruction="Sort the words alphabetically: b a"
    )
    assert "Sort the words alphabetically: b a" in prompt and prompt.endswith("\n")


def test_tokenize_instructions_masks_exactly_the_prompt(instructions, tiny_tokenizer):
    ds, _ = instructions
    tokenized = tokenize_instructions(ds["test"], tiny_tokenizer)
    assert tokenized.column_names == ["input_ids", "labels"]
    for row, tok in zip(ds["test"], tokenized):
        prompt_ids = tiny_tokenizer(format_prompt(row["instruction"]))["input_ids"]
        n = len(prompt_ids)
        assert tok["input_ids"][:n] == prompt_ids  # what generation will see
        assert tok["labels"][:n] == [IGNORE_INDEX] * n
        assert tok["labels"][n:] == tok["input_ids"][n:]
        assert tok["input_ids"][-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(tok["input_ids"][n:-1]) == row["answer"]
    with pytest.raises(ValueError, match="max_length"):
        tokenize_instructions(ds["test"], tiny_tokenizer, max_length=8)
    with pytest.raises(ValueError, match="missing"):
        tokenize_instructions(ds["test"].remove_columns("answer"), tiny_tokenizer)


def test_collator_pads_dynamically_and_masks_prompt_and_padding(instructions, tiny_tokenizer):
    ds, _ = instructions
    tokenized = tokenize_instructions(ds["test"].select(range(0, 100, 20)), tiny_tokenizer)
    features = list(tokenized)
    batch = InstructionCollator(tiny_tokenizer)(features)
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == (5, longest)
    assert batch["input_ids"].dtype == torch.long
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert batch["input_ids"][i, n:].eq(tiny_tokenizer.pad_token_id).all()
        assert batch["labels"][i].tolist() == f["labels"] + [IGNORE_INDEX] * (longest - n)
        masked = sum(1 for x in f["labels"] if x == IGNORE_INDEX)
        assert masked == len(
            tiny_tokenizer(format_prompt(ds["test"][i * 20]["instruction"]))["input_ids"]
        )
    padded = InstructionCollator(tiny_tokenizer, pad_to_multiple_of=16)(features)
    assert padded["input_ids"].shape[1] % 16 == 0
    with pytest.raises(ValueError, match="empty batch"):
        InstructionCollator(tiny_tokenizer)([])
    with pytest.raises(ValueError, match="labels"):
        InstructionCollator(tiny_tokenizer)([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="differ in length"):
        InstructionCollator(tiny_tokenizer)([{"input_ids": [1, 2], "labels": [1]}])


def test_collator_batch_trains_a_model(tiny_model_dir, tiny_tokenizer, instructions):
    from transformers import AutoModelForCausalLM

    ds, _ = instructions
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = InstructionCollator(tiny_tokenizer)(
        list(tokenize_instructions(ds["test"].select(range(8)), tiny_tokenizer))
    )
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


# ---------------------------------------------------------------------------------------------
# bad input and the library collator
# ---------------------------------------------------------------------------------------------


def test_task_spec_missing_a_field_names_the_task_example_and_field(tmp_path):
    specs = json.loads(json.dumps(TASK_SPECS))
    del specs["date"]["months"]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(specs))
    config = InstructionConfig(
        tasks=("date",),
        train_per_task=5,
        validation_per_task=1,
        test_per_task=1,
        task_specs_path=str(path),
    )
    with pytest.raises(
        ValueError,
        match=r"task 'date' in .*tasks.json: example 0 needs the "
        r"field 'months'",
    ):
        make_instruction_dataset(config)
    specs["date"]["months"] = ["January"]  # present but too short: the failing lookup is named
    path.write_text(json.dumps(specs))
    with pytest.raises(
        ValueError, match=r"task 'date' in .*: example \d+ failed on a field .*IndexError"
    ):
        make_instruction_dataset(config)


def test_null_answer_names_the_task_example_and_field(tiny_tokenizer):
    from datasets import Dataset

    rows = [
        {"task": "add", "instruction": "What is 1 plus 2?", "answer": "3"},
        {"task": "sort", "instruction": "Sort the words alphabetically: b a", "answer": None},
    ]
    with pytest.raises(ValueError, match=r"example 1 \(task 'sort'\): field 'answer' is None"):
        tokenize_instructions(Dataset.from_list(rows), tiny_tokenizer)


def test_collator_pads_right_like_transformers_whatever_the_tokenizer(instructions, tiny_tokenizer):
    # Replaces an isinstance check (InstructionCollator subclasses DataCollatorForSeq2Seq, so it
    # could not fail): the batches are compared with transformers' own collator instead.
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    ds, _ = instructions
    features = list(tokenize_instructions(ds["test"].select(range(0, 100, 20)), tiny_tokenizer))
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) > 1, "rows of different lengths, or padding is not exercised"

    def library(tokenizer):
        return DataCollatorForSeq2Seq(
            tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt"
        )(features)

    right = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path, padding_side="right")
    left = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path, padding_side="left")
    reference = library(right)
    for tokenizer in (right, left):
        batch = InstructionCollator(tokenizer)(features)
        assert set(batch) == set(reference)
        for key in reference:
            assert batch[key].tolist() == reference[key].tolist(), (tokenizer.padding_side, key)
    assert left.padding_side == "left"  # the caller's tokenizer is left as it was
    # The library collator follows a left-padding tokenizer: forcing the right side is real work.
    assert library(left)["input_ids"].tolist() != reference["input_ids"].tolist()
    assert reference["attention_mask"][:, 0].all()  # padding at the end
    shortest = lengths.index(min(lengths))
    assert reference["labels"][shortest, min(lengths) :].eq(-100).all()
