"""An instruction data set of templated tasks with exactly checkable answers, and its loss masking.

Tasks (``lmref.data.instruction_tasks``: dates in words, 12-hour time, digits spelled out,
reversing / sorting / upper-casing words, addition) turn an input into a short answer that is
not a copy of it, so exact match measures a learned transformation. Each instruction is unique across train, validation and test;
each split is stratified (every task equally often) and shuffled so that any prefix of
``k * len(tasks)`` rows holds ``k`` of each task: an evaluation on the first N rows measures all
tasks, not the first one. Validation is for every choice (eval loss, searches, sweeps), test for
the final numbers only (``lmref.core.stats`` gives them their interval). The
prompt template, the tokenization that masks the prompt out of the loss (labels -100), and the
collator that pads a batch (transformers' ``DataCollatorForSeq2Seq``) live here too.
The corpus side of data preparation (sources, cleaning, dedup, tokenizer, packing) is
``lmref.data.pipeline``; this module does not need it.

Usage::

    from lmref.data.instructions import (InstructionCollator, InstructionConfig, format_prompt,
                                        make_instruction_dataset, tokenize_instructions)

    raw, stats = make_instruction_dataset(InstructionConfig(train_per_task=2000))
    tokenized = tokenize_instructions(raw["train"], tokenizer)   # input_ids, labels
    batch = InstructionCollator(tokenizer)(list(tokenized.select(range(8))))
    print(format_prompt(raw["validation"][0]["instruction"]) + raw["validation"][0]["answer"])
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict
from transformers import DataCollatorForSeq2Seq

from lmref.core.losses import IGNORE_INDEX  # the label the loss skips: one constant, in core
from lmref.data.instruction_tasks import TASK_SPECS, checked_example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Answer:\n"


@dataclass
class InstructionConfig:
    """Which tasks, how many unique examples of each, and the seed."""

    tasks: tuple[str, ...] = ("date", "time", "digits", "sort", "uppercase")
    train_per_task: int = 2000
    validation_per_task: int = 50
    test_per_task: int = 100
    seed: int = 0
    task_specs_path: str | None = None  # a JSON shaped like TASK_SPECS; None = the built-in table


def _stratified(per_task: list[list[dict]], rng: random.Random) -> list[dict]:
    """Rows of every task interleaved in rounds of one per task, each round in a random order
    (and each task's rows shuffled first): stratified and shuffled at once."""
    for rows in per_task:
        rng.shuffle(rows)
    out: list[dict] = []
    for round_ in range(max(map(len, per_task), default=0)):
        picks = [rows[round_] for rows in per_task if round_ < len(rows)]
        rng.shuffle(picks)
        out += picks
    return out


def make_instruction_dataset(config: InstructionConfig | None = None) -> tuple[DatasetDict, dict]:
    """A train/validation/test DatasetDict (columns ``task``, ``instruction``, ``answer``).

    Each instruction is unique across the splits, so no evaluation input is ever seen in
    training: accuracy measures the learned transformation, not memorisation. Each split is
    stratified by task and shuffled (see the module docstring).
    """
    config = config or InstructionConfig()
    where = config.task_specs_path or "TASK_SPECS"
    specs = (
        json.loads(Path(config.task_specs_path).read_text())
        if config.task_specs_path
        else TASK_SPECS
    )
    rng = random.Random(config.seed)
    per_task: dict[str, list[list[dict]]] = {"train": [], "validation": [], "test": []}
    stats: dict[str, Any] = {"tasks": {}}
    for task in config.tasks:
        if task not in specs:
            raise ValueError(f"unknown task {task!r}; known: {sorted(specs)}")
        held_out = config.validation_per_task + config.test_per_task
        wanted = config.train_per_task + held_out
        examples: dict[str, str] = {}
        copies = 0
        # Rejection sampling of distinct inputs; a task with fewer distinct inputs than wanted
        # (e.g. 810 additions) gives all it has to train, after the test share.
        for n in range(30 * wanted):
            if len(examples) == wanted:
                break
            instruction, answer = checked_example(task, specs[task], rng, n, where)
            if answer in instruction:  # e.g. words already in order: a copy, not a transformation
                copies += 1
                continue
            examples.setdefault(instruction, answer)
        if len(examples) <= held_out:
            raise ValueError(
                f"task {task!r} has only {len(examples)} distinct inputs, not more than "
                f"validation_per_task + test_per_task = {held_out}"
            )
        items = list(examples.items())  # insertion order is deterministic for a given seed
        for split, part in (
            ("test", items[: config.test_per_task]),
            ("validation", items[config.test_per_task : held_out]),
            ("train", items[held_out:]),
        ):
            per_task[split].append([{"task": task, "instruction": i, "answer": a} for i, a in part])
        stats["tasks"][task] = {
            "train": len(items) - held_out,
            "validation": config.validation_per_task,
            "test": config.test_per_task,
            "rejected_copies": copies,
            "example": items[0],
        }
    rows = {split: _stratified(parts, rng) for split, parts in per_task.items()}
    train_inputs = {r["instruction"] for r in rows["train"]}
    shared = sum(r["instruction"] in train_inputs for r in rows["validation"] + rows["test"])
    assert shared == 0, "an instruction is in train and in a held-out split"
    ds = DatasetDict({k: Dataset.from_list(v) for k, v in rows.items()})
    stats.update(
        train=len(ds["train"]),
        validation=len(ds["validation"]),
        test=len(ds["test"]),
        shared_inputs=shared,
        answer_chars_max=max(len(r["answer"]) for v in rows.values() for r in v),
        seed=config.seed,
    )
    return ds, stats


def save_instruction_dataset(
    config: InstructionConfig | None = None, out_dir: str | Path = "artifacts/data/instructions"
) -> dict:
    """Build the set (see :func:`make_instruction_dataset`), ``save_to_disk`` it, return its stats."""
    ds, stats = make_instruction_dataset(config)
    ds.save_to_disk(str(out_dir))
    return stats


def format_prompt(instruction: str) -> str:
    """The prompt template; the model is trained to continue it with the answer and then EOS."""
    return PROMPT_TEMPLATE.format(instruction=instruction)


def tokenize_instructions(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 128,
    prompt_format: Callable[[str], str] = format_prompt,
) -> Dataset:
    """``input_ids`` = prompt + answer + EOS; ``labels`` = -100 on the prompt, the ids elsewhere.

    Prompt and answer are tokenized separately, so the prompt's tokens are exactly those the model
    sees at generation time (``tokenizer(prompt_format(instruction))``; a chat model passes its own
    template here, e.g. ``lambda x: tokenizer.apply_chat_template(...)``). Raises ``ValueError``
    naming the example (and its task) when an instruction or answer is not a string, or when an
    example is longer than ``max_length`` (truncation would cut the answer off).
    """
    missing = {"instruction", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"dataset needs columns instruction and answer; missing {sorted(missing)}")

    def encode(batch: dict, indices: list[int]) -> dict:
        for field in ("instruction", "answer"):
            for i, value in zip(indices, batch[field]):
                if not isinstance(value, str):
                    task = f" (task {batch['task'][i - indices[0]]!r})" if "task" in batch else ""
                    raise ValueError(
                        f"example {i}{task}: field {field!r} is {value!r}, not a string"
                    )
        prompts = tokenizer(
            [prompt_format(i) for i in batch["instruction"]], add_special_tokens=False
        )["input_ids"]
        answers = tokenizer(batch["answer"], add_special_tokens=False)["input_ids"]
        input_ids, labels = [], []
        for i, p, a in zip(indices, prompts, answers):
            ids = p + a + [tokenizer.eos_token_id]
            if len(ids) > max_length:
                raise ValueError(f"example {i}: {len(ids)} tokens > max_length={max_length}")
            input_ids.append(ids)
            labels.append([IGNORE_INDEX] * len(p) + a + [tokenizer.eos_token_id])
        return {"input_ids": input_ids, "labels": labels}

    return ds.map(
        encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc="tokenize"
    )


class InstructionCollator(DataCollatorForSeq2Seq):
    """Pad ``{"input_ids", "labels"}`` rows to the longest in the batch: transformers' collator.

    ``DataCollatorForSeq2Seq`` pads ``input_ids`` with the pad token, adds ``attention_mask`` and
    pads ``labels`` with -100 (padding, like the prompt, carries no loss). This subclass only
    fixes the course's choices and checks the rows first, so a malformed one is named instead of
    failing inside the padding: right padding whatever the tokenizer's default (fine for training;
    batched generation pads on the left instead) on a copy, so the caller's tokenizer is unchanged.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        if tokenizer.padding_side != "right":
            tokenizer = copy.copy(tokenizer)
            tokenizer.padding_side = "right"
        super().__init__(
            tokenizer,
            padding="longest",
            pad_to_multiple_of=pad_to_multiple_of,
            label_pad_token_id=IGNORE_INDEX,
            return_tensors="pt",
        )

    def __call__(self, features: list[dict], return_tensors: str | None = None):
        if not features:
            raise ValueError("empty batch")
        for i, f in enumerate(features):
            if "input_ids" not in f or "labels" not in f:
                raise ValueError(f"row {i} needs input_ids and labels (see tokenize_instructions)")
            if len(f["input_ids"]) != len(f["labels"]):
                raise ValueError(
                    f"row {i}: input_ids ({len(f['input_ids'])}) and labels "
                    f"({len(f['labels'])}) differ in length"
                )
        return super().__call__(
            [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features],
            return_tensors,
        )
