"""Glue for the notebooks: where artifacts live, the course's recipes, and rebuilding artifacts.

Each notebook runs standalone in a fresh kernel. When it needs an earlier notebook's output
(the data of 01, the base model of 02) and that is missing, it calls ``ensure_*`` here, which
runs the same code, with the same recipe, as the earlier notebook. This module is the one place
that ties the other ``lmref`` modules together; they stay copyable on their own.

Usage::

    from lmref.lab.course import ARTIFACTS, ensure_base, load_instruction_eval

    base_dir = ensure_base()                     # pretrains artifacts/base/ if it is not there
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmref.core.losses import answer_loss_sum
from lmref.core.manifest import write_manifest
from lmref.data.instructions import (
    PROMPT_TEMPLATE,
    InstructionCollator,
    format_prompt,
    save_instruction_dataset,
    tokenize_instructions,
)
from lmref.data.pipeline import load_prepared, prepare_data
from lmref.models.artifacts import ARTIFACTS, checkout_root
from lmref.models.loading import load_model
from lmref.models.presets import build_model
from lmref.training.config import TrainingConfig, TrainResult
from lmref.training.loop import train

# The course runs from a source checkout: its notebooks, data/ and benchmarks/ live there.
REPO_ROOT = checkout_root()
if REPO_ROOT is None:
    raise ImportError(
        "lmref.lab.course is the notebooks' glue and needs the source checkout (git clone, then "
        "pip install -e .); the stages (lmref.data, lmref.training, ...) work from any install"
    )

# The recipes of notebook 02, sized for 2 CPU cores (a few minutes). Notebooks override the
# step counts from environment variables; ensure_base()/ensure_full_ft() use these values.
# Pretraining peaks at 1e-3: at 3e-3 the base reached a similar perplexity (264 vs 295) but
# fine-tuned far worse (11-15% exact match after 300 steps instead of 79%; measured on the
# course CPU) -- its attention had not learnt to look back at the prompt.
PRETRAIN = TrainingConfig(
    output_dir=str(ARTIFACTS / "runs" / "pretrain"),
    max_steps=130,
    per_device_train_batch_size=16,
    learning_rate=1e-3,
    warmup_steps=20,
    weight_decay=0.1,
    eval_steps=50,
    eval_max_batches=4,
    logging_steps=10,
    save_steps=50,
)
# Fine-tuning differs from pretraining only in these settings.
FINETUNE = replace(
    PRETRAIN,
    output_dir=str(ARTIFACTS / "runs" / "full-ft"),
    max_steps=300,
    gradient_accumulation_steps=2,
    learning_rate=2e-3,
    eval_steps=100,
    eval_max_batches=4,
)


def ensure_data(data_dir: Path | str | None = None) -> Path:
    """``artifacts/data`` (corpus, tokenizer, instructions), built by notebook 01's code if missing."""
    data_dir = Path(data_dir or ARTIFACTS / "data")
    if not (data_dir / "report.json").exists():
        prepare_data(out_dir=data_dir)
    if not (data_dir / "instructions" / "dataset_dict.json").exists():
        save_instruction_dataset(out_dir=data_dir / "instructions")
    return data_dir


def load_corpus(data_dir: Path | str | None = None) -> tuple[PreTrainedTokenizerBase, DatasetDict]:
    return load_prepared(ensure_data(data_dir))


def load_instructions(
    tokenizer: PreTrainedTokenizerBase,
    data_dir: Path | str | None = None,
) -> tuple[DatasetDict, DatasetDict, InstructionCollator]:
    """The instruction set raw (task, instruction, answer) and tokenized with prompt masking."""
    raw = load_from_disk(str(ensure_data(data_dir) / "instructions"))
    tokenized = DatasetDict({k: tokenize_instructions(v, tokenizer) for k, v in raw.items()})
    return raw, tokenized, InstructionCollator(tokenizer)


def load_instruction_eval(raw_split) -> tuple[list[str], list[str]]:
    """Prompts (in the course's template) and answers for exact-match evaluation."""
    return [format_prompt(x) for x in raw_split["instruction"]], list(raw_split["answer"])


def eval_rows(raw: DatasetDict, split: str, n: int | None = None) -> Dataset:
    """A notebook's one fixed evaluation subset: the first ``n`` rows of ``split`` ("validation"
    for choices, "test" for final numbers). The splits are stratified and shuffled, so the
    first ``n`` rows cover every task equally; every run and every model sees the same rows."""
    if split not in raw:
        raise ValueError(f"no {split!r} split; the instruction set has {sorted(raw)}")
    return raw[split].select(range(min(n or len(raw[split]), len(raw[split]))))


# The course's instruction format as a Jinja chat template, saved with the fine-tuned model so that
# /v1/chat/completions (and apply_chat_template) send it exactly the prompt it was trained on.
COURSE_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    + PROMPT_TEMPLATE.replace("{instruction}", "{{ m['content'] }}")
    + "{% endif %}{% endfor %}"
)

# The real pretrained chat model of the course (converted from its packaged GGUF on first use).
REAL_MODEL = "smollm2-135m-instruct"


def real_text_blocks(
    tokenizer: PreTrainedTokenizerBase,
    split: str = "validation",
    n_tokens: int = 512,
    block_size: int = 256,
    data_dir: Path | str | None = None,
) -> torch.Tensor:
    """``n_tokens`` of the course corpus's ``split`` in ``tokenizer``'s tokens, as rows of
    ``block_size``: the docstrings of notebook 01, decoded from its blocks and re-tokenized, so a
    real model is measured on held-out real text (calibrate on "train", evaluate on "validation").
    """
    if n_tokens % block_size:
        raise ValueError(f"n_tokens={n_tokens} is not a multiple of block_size={block_size}")
    course_tokenizer, corpus = load_corpus(data_dir)
    ids: list[int] = []
    for row in corpus[split]:
        ids += tokenizer(course_tokenizer.decode(row["input_ids"]), add_special_tokens=False)[
            "input_ids"
        ]
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens]).reshape(-1, block_size)
    raise ValueError(
        f"the {split!r} split holds {len(ids)} tokens of this tokenizer, fewer than {n_tokens}"
    )


def chat_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """One user turn in the model's own chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def chat_instructions(
    tokenizer: PreTrainedTokenizerBase,
    split: str = "train",
    n: int | None = None,
    task: str | None = None,
    data_dir: Path | str | None = None,
) -> tuple[Dataset, list[str], list[str]]:
    """Notebook 01's instruction set for a chat model: tokenized with the prompt masked
    (``labels`` -100) and the answer ended by the template's end-of-turn token, plus the raw
    prompts and answers for exact match. ``task`` keeps one task ("digits", "time", ...)."""
    raw = load_from_disk(str(ensure_data(data_dir) / "instructions"))[split]
    if task is not None:
        raw = raw.filter(lambda row: row["task"] == task)
    if len(raw) == 0:
        raise ValueError(f"no {task!r} examples in the {split!r} split of the instruction set")
    raw = raw.select(range(min(n or len(raw), len(raw))))
    tokenized = tokenize_instructions(
        raw, tokenizer, max_length=512, prompt_format=lambda x: chat_prompt(tokenizer, x)
    )
    return tokenized, [chat_prompt(tokenizer, x) for x in raw["instruction"]], list(raw["answer"])


def pretrain_base(
    out_dir: Path | str | None = None,
    config: TrainingConfig = PRETRAIN,
    preset: str = "tiny",
    data_dir: Path | str | None = None,
) -> TrainResult:
    """Notebook 02's pretraining: a ``preset`` model on the packed corpus, saved in HF format."""
    out_dir = Path(out_dir or ARTIFACTS / "base")
    tokenizer, corpus = load_corpus(data_dir)
    model = build_model(
        preset,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    result = train(model, corpus["train"], config, eval_dataset=corpus["validation"])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "train_result.json").write_text(
        json.dumps({k: v for k, v in vars(result).items() if k != "history"}, indent=1)
    )
    write_manifest(out_dir)  # last: the server refuses a folder that differs from it
    return result


def train_on_instructions(
    model, tokenized, collator, config: TrainingConfig, callbacks=(), loss_fn=answer_loss_sum
):
    """Train on the instruction set's train split, evaluated on its validation split (every
    choice is made on validation; test is for the final numbers only). The loss counts answer
    tokens only, so ``answer_loss_sum`` runs the output head at those positions alone: the same
    loss as ``causal_lm_loss_sum`` up to float rounding, a step ~15% shorter."""
    return train(
        model,
        tokenized["train"],
        config,
        eval_dataset=tokenized["validation"],
        collate_fn=collator,
        callbacks=callbacks,
        loss_fn=loss_fn,
    )


def finetune(
    base_dir: Path | str,
    out_dir: Path | str,
    config: TrainingConfig = FINETUNE,
    data_dir: Path | str | None = None,
    callbacks=(),
) -> TrainResult:
    """Notebook 02's full fine-tuning on the instruction set, saved in HF format."""
    out_dir = Path(out_dir)
    model = load_model(str(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, tokenized, collator = load_instructions(tokenizer, data_dir)
    result = train_on_instructions(model, tokenized, collator, config, callbacks)
    model.save_pretrained(out_dir)
    tokenizer.chat_template = COURSE_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    write_manifest(out_dir)  # last: the server refuses a folder that differs from it
    return result


def ensure_base(base_dir: Path | str | None = None) -> Path:
    """``artifacts/base``: the pretrained base model, pretrained with notebook 02's recipe if missing."""
    base_dir = Path(base_dir or ARTIFACTS / "base")
    if not (base_dir / "model.safetensors").exists():
        pretrain_base(base_dir, replace(PRETRAIN, disable_tqdm=True))
    return base_dir


def ensure_full_ft(out_dir: Path | str | None = None) -> Path:
    """``artifacts/full-ft``: the fully fine-tuned model, rebuilt with notebook 02's recipe if missing."""
    out_dir = Path(out_dir or ARTIFACTS / "full-ft")
    if not (out_dir / "model.safetensors").exists():
        finetune(ensure_base(), out_dir, replace(FINETUNE, disable_tqdm=True))
    return out_dir


@lru_cache(maxsize=2)
def tokenized_instructions(base_dir: str):
    """The instruction set in ``base_dir``'s tokenizer and its collator, cached per model dir."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, tokenized, collator = load_instructions(tokenizer)
    return tokenized, collator
