"""``python -m lmref.train``: the training loop as a command, for one process or many (torchrun).

Every ``TrainingConfig`` field is a flag (``--max-steps``, ``--per-device-train-batch-size`` or
``--batch-size``, ``--learning-rate`` or ``--lr``, ``--resume``, ``--allow-config-change`` ...),
and a JSON or YAML file given with ``--config`` may set any of them plus the run's own keys
(model, data, ...); flags on the command line win over the file. The final model is saved in Hugging Face format (rank 0).

Usage::

    python -m lmref.train --model tiny --max-steps 200 --output-dir artifacts/runs/cli
    torchrun --standalone --nproc-per-node 2 -m lmref.train --max-steps 200 --batch-size 8
    torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m lmref.train --resume \\
        --save-steps 20 --output-dir artifacts/runs/ft       # survives a worker failure
    python -m lmref.train --config run.yaml --lr 1e-3

Fault injection (to practise recovery): ``LMREF_FAIL_AT_STEP=k LMREF_FAIL_RANK=r`` makes rank r
exit hard after step k on the first attempt (see ``lmref.training.distributed.fault_injection_from_env``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset, DatasetDict, disable_progress_bars, load_from_disk
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from lmref.data.pipeline import empty_splits_on_disk
from lmref.training.distributed import (
    barrier,
    distributed,
    fault_injection_from_env,
    is_main,
    print0,
    unwrap_model,
    wrap_model,
)
from lmref.models.loading import PRESETS, build_model, load_model
from lmref.training.loop import CheckpointError, ConfigChangeError, TrainingConfig, train

ALIASES = {
    "per_device_train_batch_size": ["--batch-size"],
    "gradient_accumulation_steps": ["--grad-accum"],
    "learning_rate": ["--lr"],
    "resume_from_checkpoint": ["--resume"],
}


@dataclass
class RunConfig:
    """What the command trains on and where it saves, besides the ``TrainingConfig`` knobs."""

    model: str = "tiny"  # a preset of lmref.models.loading, or an HF id / folder
    model_overrides: dict = field(default_factory=dict)  # config fields for a preset
    attn_implementation: str | None = None  # None: the model's default (eager, sdpa, ...)
    data: str | None = None  # load_from_disk folder; default: the course corpus
    tokenizer: str | None = None  # default: <data>/../tokenizer when it exists
    train_split: str = "train"
    eval_split: str | None = "validation"  # None (or "none"): no evaluation
    max_train_samples: int | None = None  # the first N training blocks only
    final_dir: str | None = None  # default: <output_dir>/final
    training: TrainingConfig = field(default_factory=TrainingConfig)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in {"none", "null", ""} else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _resume(text: str):
    return {"true": True, "false": False}.get(text.lower(), text)


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: a flag absent from the command line is absent from the namespace, so it cannot
    # overwrite what the config file set.
    parser = argparse.ArgumentParser(
        prog="python -m lmref.train",
        argument_default=argparse.SUPPRESS,
        description="Train a causal LM with lmref.training.loop (DDP under torchrun).",
    )
    parser.add_argument("--config", help="JSON or YAML file of RunConfig/TrainingConfig keys")
    run = parser.add_argument_group("run")
    run.add_argument("--model", help=f"preset ({', '.join(PRESETS)}) or HF model id/folder")
    run.add_argument(
        "--model-overrides",
        type=json.loads,
        help="JSON of config fields for a preset, e.g. '{\"num_hidden_layers\": 2}'",
    )
    run.add_argument(
        "--attn-implementation",
        type=_optional(str),
        help="eager, sdpa, flash_attention_2...; default: the model's own",
    )
    run.add_argument("--data", help="datasets.load_from_disk folder with an input_ids column")
    run.add_argument("--tokenizer", help="tokenizer folder (saved with the final model)")
    run.add_argument("--train-split")
    run.add_argument("--eval-split", type=_optional(str))
    run.add_argument("--max-train-samples", type=_optional(int))
    run.add_argument("--final-dir")
    knobs = parser.add_argument_group("training (lmref.training.loop.TrainingConfig)")
    for f in dataclasses.fields(TrainingConfig):
        flags = [f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, [])]
        default = f.default
        if f.name == "resume_from_checkpoint":
            knobs.add_argument(
                *flags,
                dest=f.name,
                nargs="?",
                const=True,
                type=_resume,
                help="resume from the latest checkpoint in output_dir, or PATH",
            )
        elif f.name == "precision":
            knobs.add_argument(*flags, dest=f.name, choices=["auto", "fp32", "bf16", "fp16"])
        elif isinstance(default, bool):
            knobs.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction)
        elif f.type in ("float | None", "int | None"):
            kind = float if f.type.startswith("float") else int
            knobs.add_argument(
                *flags, dest=f.name, type=_optional(kind), metavar=kind.__name__.upper()
            )
        else:
            knobs.add_argument(
                *flags, dest=f.name, type=type(default), metavar=type(default).__name__.upper()
            )
    return parser


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Defaults, then the ``--config`` file, then command-line flags."""
    given = vars(build_parser().parse_args(argv))
    values: dict = {}
    if "config" in given:
        path = Path(given.pop("config"))
        if not path.is_file():
            raise SystemExit(f"error: config file {path} not found")
        text = path.read_text()
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {path} must hold a mapping of keys to values")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(given)
    run_keys = {f.name for f in dataclasses.fields(RunConfig)} - {"training"}
    train_keys = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - run_keys - train_keys)
    if unknown:
        raise SystemExit(
            f"error: unknown config keys {unknown}; known: {sorted(run_keys | train_keys)}"
        )
    if "disable_tqdm" not in values and not sys.stderr.isatty():
        # A progress bar piped to a log (torchrun, a notebook subprocess) is one endless line.
        values["disable_tqdm"] = True
    if isinstance(values.get("eval_split"), str) and values["eval_split"].lower() == "none":
        values["eval_split"] = None
    try:
        training = TrainingConfig(**{k: v for k, v in values.items() if k in train_keys})
    except ValueError as e:  # a setting that cannot make a run: say which, no traceback
        raise SystemExit(f"error: {e}") from None
    return RunConfig(**{k: v for k, v in values.items() if k in run_keys}, training=training)


def load_data(config: RunConfig) -> tuple[Dataset, Dataset | None, Path | None]:
    """Train and eval splits, and the tokenizer folder that goes with them (if any)."""
    if config.data is None:
        # Rank 0 builds the course data if missing; the others wait rather than build it too.
        from lmref.lab.course import ARTIFACTS, ensure_data  # imported only when needed: it is heavy

        if is_main():
            ensure_data()
        barrier()
        data_path = ARTIFACTS / "data" / "corpus"
    else:
        data_path = Path(config.data)
    if not data_path.exists():
        raise SystemExit(f"error: no dataset at {data_path}")
    for name in empty_splits_on_disk(data_path):  # load_from_disk fails on them, deep inside
        raise SystemExit(
            f"error: the {name!r} split of {data_path} has no rows; prepare the "
            "data again (see lmref.data.pipeline.prepare_data) or save it without that split"
        )
    data = load_from_disk(str(data_path))
    if isinstance(data, DatasetDict):
        if config.train_split not in data:
            raise SystemExit(
                f"error: {data_path} has no split {config.train_split!r} ({list(data)})"
            )
        train_set = data[config.train_split]
        eval_set = data.get(config.eval_split) if config.eval_split else None
    else:
        train_set, eval_set = data, None
    if len(train_set) == 0:
        raise SystemExit(f"error: the training data at {data_path} has no rows")
    if "input_ids" not in train_set.column_names:
        raise SystemExit(f"error: {data_path} has no input_ids column ({train_set.column_names})")
    if config.max_train_samples:
        train_set = train_set.select(range(min(config.max_train_samples, len(train_set))))
    tokenizer = Path(config.tokenizer) if config.tokenizer else data_path.parent / "tokenizer"
    if config.tokenizer and not tokenizer.is_dir():
        raise SystemExit(f"error: no tokenizer folder at {tokenizer}")
    return train_set, eval_set, tokenizer if tokenizer.is_dir() else None


def make_model(config: RunConfig, tokenizer) -> torch.nn.Module:
    if config.model in PRESETS:
        special = {}
        if tokenizer is not None:
            special = dict(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        if config.attn_implementation:
            special["attn_implementation"] = config.attn_implementation
        return build_model(
            config.model, seed=config.training.seed, **{**special, **config.model_overrides}
        )
    if config.model_overrides:
        raise SystemExit("error: --model-overrides applies to presets, not to a pretrained model")
    # fp32 master weights: mixed precision comes from autocast (TrainingConfig.precision).
    return load_model(
        config.model,
        dtype=torch.float32,
        device="cpu",
        attn_implementation=config.attn_implementation,
    )


def check_vocabulary(dataset: Dataset, model: torch.nn.Module) -> None:
    sample = dataset.select(range(min(len(dataset), 512)))["input_ids"]
    largest = max((max(row) for row in sample if len(row)), default=-1)
    vocab = model.get_input_embeddings().num_embeddings
    if largest >= vocab:
        raise SystemExit(
            f"error: the data holds token id {largest}, the model's vocabulary has "
            f"{vocab} entries (pass --tokenizer or --model-overrides vocab_size)"
        )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    training = config.training
    if training.disable_tqdm:  # the libraries' own bars (loading weights, saving) too
        disable_progress_bars()
        hf_logging.disable_progress_bar()
    with distributed() as env:
        train_set, eval_set, tokenizer_dir = load_data(config)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
        model = make_model(config, tokenizer)
        check_vocabulary(train_set, model)
        model = wrap_model(model, env)
        print0(
            f"lmref.train: {config.model} on {env.world_size} process(es), device "
            f"{env.device.type}, {len(train_set)} training blocks, global batch "
            f"{training.per_device_train_batch_size * training.gradient_accumulation_steps * env.world_size}"
            f", attempt {env.restart_count}"
        )
        callbacks = [cb for cb in [fault_injection_from_env(env=env)] if cb is not None]
        try:
            result = train(model, train_set, training, eval_dataset=eval_set, callbacks=callbacks)
        except (CheckpointError, ConfigChangeError) as e:  # the message says what to do
            raise SystemExit(f"error: {e}") from None
        final_dir = Path(config.final_dir or Path(training.output_dir) / "final")
        if result.step == result.resumed_from_step and (final_dir / "train_result.json").exists():
            # A finished run resumed again trains nothing: its final model and numbers stand.
            print0(
                f"lmref.train: the run had already finished at step {result.step}; "
                f"{final_dir} left as it was"
            )
        elif env.is_main:
            unwrap_model(model).save_pretrained(final_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(final_dir)
            summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "history"}
            summary.update(
                world_size=env.world_size, final_dir=str(final_dir), restart_count=env.restart_count
            )
            (final_dir / "train_result.json").write_text(json.dumps(summary, indent=1))
            print0(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
