"""``python -m lmref.train``: the training loop as a command, for one process or many (torchrun).

Every field of ``RunArguments`` (model, data, ...) and of ``TrainingConfig`` is a flag
(``--max-steps``, ``--per-device-train-batch-size`` or ``--batch-size``, ``--learning-rate`` or
``--lr``, ``--resume``, ``--allow-config-change`` ...): ``lmref.core.cli`` (``transformers.HfArgumentParser``) derives
them from the dataclasses (help and aliases from the fields' metadata). A JSON or YAML file given
with ``--config`` may set any of them; flags on the command line win over the file. The final
model is saved in Hugging Face format (rank 0), with a manifest like a checkpoint's: resuming a
finished run leaves a final folder that verifies as it is and rebuilds a damaged one from the
last checkpoint.

Usage::

    python -m lmref.train --model tiny --max-steps 200 --output-dir artifacts/runs/cli
    torchrun --standalone --nproc-per-node 2 -m lmref.train --max-steps 200 --batch-size 8
    torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m lmref.train --resume \\
        --save-steps 20 --output-dir artifacts/runs/ft       # survives a worker failure
    python -m lmref.train --config run.yaml --lr 1e-3
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m lmref.train --report-to mlflow \\
        --run-name tiny-ft        # params, metrics, lineage; the final folder as artifact "model"

Parallelism (``lmref.training.parallel``): ``--parallel ddp`` (default), ``fsdp``
(``--reshard-after-forward``, ``--cpu-offload``), ``tp`` (``--sequence-parallel``), ``pp``
(``--pp-schedule gpipe|1f1b``, ``--pp-microbatches``) or ``fsdp+tp`` (``--tensor-parallel-size``);
sharded runs checkpoint through ``torch.distributed.checkpoint`` and resume at another world size
or mode (with ``--allow-config-change`` when the world size or batch size changes)::

    torchrun --standalone --nproc-per-node 2 -m lmref.train --parallel fsdp --max-steps 50

Fault injection (to practise recovery): ``LMREF_FAIL_AT_STEP=k LMREF_FAIL_RANK=r`` makes rank r
exit hard after step k on the first attempt (see ``lmref.training.distributed.fault_injection_from_env``).
"""

from __future__ import annotations

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

from lmref.core.cli import DataclassArgumentParser
from lmref.core.ranks import is_main
from lmref.core.tracking import log_model_folder
from lmref.data.pipeline import empty_splits_on_disk
from lmref.models.loading import load_model
from lmref.models.presets import PRESETS, build_model
from lmref.models.quantized import quiet_cpu_kernel_notice
from lmref.training.checkpoints import CheckpointError, atomic_folder, verify_checkpoint
from lmref.training.config import ConfigChangeError, TrainingConfig
from lmref.training.distributed import (
    barrier,
    distributed,
    fault_injection_from_env,
    pacing_from_env,
    print0,
    wrap_model,
)
from lmref.training.loop import train
from lmref.training.parallel import ParallelConfig, make_plan


@dataclass
class RunArguments:
    """What the command trains on and where it saves, besides the ``TrainingConfig`` knobs."""

    model: str = field(
        default="tiny",
        metadata={"help": f"preset ({', '.join(PRESETS)}) or HF model id/folder"},
    )
    model_overrides: dict = field(
        default_factory=dict,
        metadata={
            "type": json.loads,
            "help": "JSON of config fields for a preset, e.g. '{\"num_hidden_layers\": 2}'",
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager, sdpa, flash_attention_2...; default: the model's own"},
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "datasets.load_from_disk folder with an input_ids column; "
            "default: the course corpus"
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "tokenizer folder (saved with the final model); "
            "default: <data>/../tokenizer when it exists"
        },
    )
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: str | None = field(
        default="validation", metadata={"help": "split to evaluate on; none: no evaluation"}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "the first N training blocks only"}
    )
    final_dir: str | None = field(default=None, metadata={"help": "default: <output_dir>/final"})


@dataclass
class RunConfig(RunArguments):
    """A whole run: ``RunArguments`` plus the loop's ``TrainingConfig``."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallelism: ParallelConfig = field(default_factory=ParallelConfig)


def build_parser() -> DataclassArgumentParser:
    """The command line: ``--config FILE``, then every ``RunArguments`` and ``TrainingConfig``
    field as a flag."""
    parser = DataclassArgumentParser(
        (RunArguments, TrainingConfig, ParallelConfig),
        prog="python -m lmref.train",
        description="Train a causal LM with lmref.training.loop (DDP under torchrun).",
    )
    parser.add_argument("--config", help="JSON or YAML file of RunArguments/TrainingConfig keys")
    return parser


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Defaults, then the ``--config`` file, then command-line flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    values: dict = {}
    config_file = parser.parse_known_args(argv)[0].config
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise SystemExit(f"error: config file {path} not found")
        text = path.read_text()
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {path} must hold a mapping of keys to values")
        values = {k.replace("-", "_"): v for k, v in loaded.items()}
    known = {
        f.name
        for cls in (RunArguments, TrainingConfig, ParallelConfig)
        for f in dataclasses.fields(cls)
    }
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: unknown config keys {unknown}; known: {sorted(known)}")
    if "disable_tqdm" not in values and not sys.stderr.isatty():
        # A progress bar piped to a log (torchrun, a notebook subprocess) is one endless line.
        values["disable_tqdm"] = True
    # The file's values become the defaults, so a flag on the command line wins over them.
    # (argparse runs a string default through the flag's type: "none" in a file means None.)
    parser.set_defaults(**values)
    try:
        run, training, parallelism, *_ = parser.parse_args_into_dataclasses(
            argv, look_for_args_file=False
        )
    except ValueError as e:  # a setting that cannot make a run: say which, no traceback
        raise SystemExit(f"error: {e}") from None
    return RunConfig(**dataclasses.asdict(run), training=training, parallelism=parallelism)


def load_data(config: RunConfig) -> tuple[Dataset, Dataset | None, Path | None]:
    """Train and eval splits, and the tokenizer folder that goes with them (if any)."""
    if config.data is None:
        # Rank 0 builds the course data if missing; the others wait rather than build it too.
        from lmref.lab.course import (
            ARTIFACTS,
            ensure_data,
        )  # imported only when needed: it is heavy

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


def save_final(model, tokenizer, final_dir: Path, summary: dict) -> None:
    # ``model``: a plain one (``ParallelPlan.full_model`` gathers a sharded one on rank 0).
    """The final folder, written as a checkpoint is (``atomic_folder``: its manifest last, one
    rename). A resume verifies it against that manifest and rebuilds a damaged one."""
    with atomic_folder(final_dir, manifest=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "train_result.json").write_text(json.dumps(summary, indent=1))


def _readable_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    # This process's own logging, set where it starts (not on import): bitsandbytes, imported
    # with the scheduler, would print a notice about an optional hub kernel in every rank.
    quiet_cpu_kernel_notice()
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
        try:
            plan = make_plan(config.parallelism, model.config)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        # DDP through this module's wrap_model (a test swaps it to count the all-reduces).
        model = wrap_model(model, env) if plan.mode == "ddp" else plan.apply(model)
        print0(
            f"lmref.train: {config.model} on {env.world_size} process(es) ({plan.mode}), device "
            f"{env.device.type}, {len(train_set)} training blocks, global batch "
            f"{training.per_device_train_batch_size * training.gradient_accumulation_steps * plan.data_world}"
            f", attempt {env.restart_count}"
        )
        callbacks = [fault_injection_from_env(env=env), pacing_from_env()]
        callbacks = [cb for cb in callbacks if cb is not None]
        try:
            result = train(
                model, train_set, training, eval_dataset=eval_set, callbacks=callbacks, plan=plan
            )
        except (CheckpointError, ConfigChangeError) as e:  # the message says what to do
            raise SystemExit(f"error: {e}") from None
        final_dir = Path(config.final_dir or Path(training.output_dir) / "final")
        finished_before = result.step == result.resumed_from_step and final_dir.exists()
        full_model = plan.full_model(model)  # every rank: a sharded model is gathered to rank 0
        # Rank 0 alone checks (and rewrites) the folder: no rank hashes files another deletes.
        damage = verify_checkpoint(final_dir) if finished_before and env.is_main else None
        if finished_before and damage is None:
            # A finished run resumed again trains nothing: its final model and numbers stand.
            print0(
                f"lmref.train: the run had already finished at step {result.step}; "
                f"{final_dir} left as it was"
            )
        elif env.is_main:
            summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "history"}
            summary.update(
                world_size=env.world_size,
                parallel=plan.mode,
                final_dir=str(final_dir),
                restart_count=env.restart_count,
            )
            if damage is not None:
                # The model was just loaded from the last checkpoint that verified: that is the
                # final model. The run's own numbers are kept where they survived.
                print0(f"lmref.train: {damage}; rebuilding {final_dir} from the last checkpoint")
                summary = _readable_json(final_dir / "train_result.json") or summary
            save_final(full_model, tokenizer, final_dir, summary)
            if result.run_id is not None:  # the tracked run's model: the folder as saved
                summary["model_uri"] = log_model_folder(
                    result.run_id, final_dir, output_dir=training.output_dir
                )
            print0(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
