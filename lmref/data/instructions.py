"""An instruction data set of templated tasks with exactly checkable answers, and its loss masking.

Tasks (dates in words, 12-hour time, digits spelled out, reversing / sorting / upper-casing
words, addition) turn an input into a short answer that is not a copy of it, so exact match
measures a learned transformation. Each instruction is unique across train and test. The
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
    print(format_prompt(raw["test"][0]["instruction"]) + raw["test"][0]["answer"])
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

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Answer:\n"

# Templated tasks whose answers are short, exactly checkable and need a transformation of the input
# (not a copy of a span of it). data/instruction_tasks.json is a copy of this table (a test keeps
# them equal); InstructionConfig.task_specs_path loads an edited one.
TASK_SPECS: dict[str, dict] = {
    "date": {
        "template": "Write the date {iso} in words.",
        "months": [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ],
        "years": [1950, 2049],
        "days": [1, 28],
    },
    "time": {
        "template": "Write {hhmm} in 12-hour time.",
    },
    "digits": {
        "template": "Spell out the digits of {number}.",
        "names": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
        "lengths": [3, 4],
    },
    "reverse": {
        "template": "Reverse the order of the words: {words}",
        "words": [
            "file",
            "list",
            "string",
            "value",
            "name",
            "type",
            "object",
            "error",
            "data",
            "line",
            "path",
            "time",
            "key",
            "module",
            "class",
            "text",
            "word",
            "code",
            "node",
            "user",
            "host",
            "port",
            "mode",
            "size",
        ],
        "lengths": [3, 4],
    },
    "sort": {
        "template": "Sort the words alphabetically: {words}",
        "words": [
            "apple",
            "bread",
            "cheese",
            "dates",
            "eggs",
            "flour",
            "grapes",
            "honey",
            "jam",
            "lemon",
            "milk",
            "nuts",
            "olives",
            "pears",
            "rice",
            "salt",
        ],
        "lengths": [3],
    },
    "add": {
        "template": "What is {a} plus {b}?",
        "a": [10, 99],
        "b": [1, 9],
    },
    "uppercase": {
        "template": "Write in capital letters: {words}",
        "words": [
            "red",
            "name",
            "default",
            "time",
            "text",
            "test",
            "node",
            "user",
            "port",
            "lock",
            "state",
            "read",
            "send",
            "run",
            "load",
        ],
        "lengths": [2, 3],
    },
}


# The fields each task reads from its spec; an edited spec missing one is named in the error.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "date": ("template", "months", "years", "days"),
    "time": ("template",),
    "digits": ("template", "names", "lengths"),
    "reverse": ("template", "words", "lengths"),
    "sort": ("template", "words", "lengths"),
    "add": ("template", "a", "b"),
    "uppercase": ("template", "words", "lengths"),
}


def _task_example(task: str, spec: dict, rng: random.Random) -> tuple[str, str]:
    t = spec["template"]
    if task == "date":
        y, m, d = rng.randint(*spec["years"]), rng.randint(1, 12), rng.randint(*spec["days"])
        return t.format(iso=f"{y:04d}-{m:02d}-{d:02d}"), f"{d} {spec['months'][m - 1]} {y}"
    if task == "time":
        h, m = rng.randint(0, 23), rng.randint(0, 59)
        return t.format(
            hhmm=f"{h:02d}:{m:02d}"
        ), f"{(h - 1) % 12 + 1}:{m:02d} {'am' if h < 12 else 'pm'}"
    if task == "digits":
        digits = [rng.randint(1, 9)] + [
            rng.randint(0, 9) for _ in range(rng.choice(spec["lengths"]) - 1)
        ]
        number = "".join(map(str, digits))
        return t.format(number=number), " ".join(spec["names"][d] for d in digits)
    if task in ("reverse", "sort", "uppercase"):
        words = rng.sample(spec["words"], rng.choice(spec["lengths"]))
        answer = {
            "reverse": lambda w: w[::-1],
            "sort": sorted,
            "uppercase": lambda w: [x.upper() for x in w],
        }[task](words)
        return t.format(words=" ".join(words)), " ".join(answer)
    if task == "add":
        a, b = rng.randint(*spec["a"]), rng.randint(*spec["b"])
        return t.format(a=a, b=b), str(a + b)
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_SPECS)}")


def _checked_example(
    task: str, spec: dict, rng: random.Random, n: int, where: str
) -> tuple[str, str]:
    """``_task_example`` with an error that names the task, the example and the field."""
    missing = [f for f in TASK_FIELDS.get(task, ()) if spec.get(f) is None]
    if missing:
        raise ValueError(
            f"task {task!r} in {where}: example {n} needs the field {missing[0]!r}, "
            f"which the spec lacks (or is null); the task reads {list(TASK_FIELDS[task])}"
        )
    try:
        return _task_example(task, spec, rng)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith("unknown task"):
            raise
        field = f"field {e.args[0]!r}" if isinstance(e, KeyError) else "a field"
        raise ValueError(
            f"task {task!r} in {where}: example {n} failed on {field} of the spec "
            f"({type(e).__name__}: {e}); check its values against TASK_SPECS"
        ) from e


@dataclass
class InstructionConfig:
    """Which tasks, how many unique examples of each, and the seed."""

    tasks: tuple[str, ...] = ("date", "time", "digits", "sort", "uppercase")
    train_per_task: int = 2000
    test_per_task: int = 100
    seed: int = 0
    task_specs_path: str | None = None  # a JSON shaped like TASK_SPECS; None = the built-in table


def make_instruction_dataset(config: InstructionConfig | None = None) -> tuple[DatasetDict, dict]:
    """A train/test DatasetDict (columns ``task``, ``instruction``, ``answer``).

    Each instruction is unique across both splits, so no test input is ever seen in training:
    test accuracy measures the learned transformation, not memorisation.
    """
    config = config or InstructionConfig()
    where = config.task_specs_path or "TASK_SPECS"
    specs = (
        json.loads(Path(config.task_specs_path).read_text())
        if config.task_specs_path
        else TASK_SPECS
    )
    rng = random.Random(config.seed)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    stats: dict[str, Any] = {"tasks": {}}
    for task in config.tasks:
        if task not in specs:
            raise ValueError(f"unknown task {task!r}; known: {sorted(specs)}")
        wanted = config.train_per_task + config.test_per_task
        examples: dict[str, str] = {}
        copies = 0
        # Rejection sampling of distinct inputs; a task with fewer distinct inputs than wanted
        # (e.g. 810 additions) gives all it has to train, after the test share.
        for n in range(30 * wanted):
            if len(examples) == wanted:
                break
            instruction, answer = _checked_example(task, specs[task], rng, n, where)
            if answer in instruction:  # e.g. words already in order: a copy, not a transformation
                copies += 1
                continue
            examples.setdefault(instruction, answer)
        if len(examples) <= config.test_per_task:
            raise ValueError(
                f"task {task!r} has only {len(examples)} distinct inputs, not more "
                f"than test_per_task={config.test_per_task}"
            )
        items = list(examples.items())  # insertion order is deterministic for a given seed
        for split, part in (
            ("test", items[: config.test_per_task]),
            ("train", items[config.test_per_task :]),
        ):
            rows[split] += [{"task": task, "instruction": i, "answer": a} for i, a in part]
        stats["tasks"][task] = {
            "train": len(items) - config.test_per_task,
            "test": config.test_per_task,
            "rejected_copies": copies,
            "example": items[0],
        }
    train_inputs = {r["instruction"] for r in rows["train"]}
    shared = sum(r["instruction"] in train_inputs for r in rows["test"])
    assert shared == 0, "an instruction is in both splits"
    ds = DatasetDict({k: Dataset.from_list(v) for k, v in rows.items()})
    stats.update(
        train=len(ds["train"]),
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
