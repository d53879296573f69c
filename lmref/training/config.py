"""The settings of a training run (``TrainingConfig``), its result (``TrainResult``) and the check
that a resume keeps the settings of the checkpoint it resumes (``check_config_change``).

Field names follow Hugging Face ``TrainingArguments`` where one exists. Each field's metadata
holds its command-line help and aliases, which ``python -m lmref.train`` reads through
``transformers.HfArgumentParser``: the dataclass is the one description of the flags.

Usage::

    from lmref.training.config import TrainingConfig

    config = TrainingConfig(output_dir="artifacts/run", max_steps=200, learning_rate=3e-3)
    config.validate()                      # also run at construction and by train()
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

from lmref.core.tracking import resolve_report_to


def _arg(default, help: str, *aliases: str):
    """A dataclass field with the ``help`` and ``aliases`` metadata HfArgumentParser reads."""
    metadata = {"help": help, **({"aliases": list(aliases)} if aliases else {})}
    return field(default=default, metadata=metadata)


@dataclass
class TrainingConfig:
    """Knobs of a run; names follow Hugging Face ``TrainingArguments`` where one exists."""

    output_dir: str = _arg("artifacts/run", "folder of checkpoints, metrics.jsonl, best/")
    max_steps: int = _arg(100, "optimizer steps of the run")
    per_device_train_batch_size: int = _arg(16, "micro-batch size per process", "--batch-size")
    gradient_accumulation_steps: int = _arg(1, "micro-batches per optimizer step", "--grad-accum")
    learning_rate: float = _arg(3e-4, "peak learning rate", "--lr")
    min_lr_ratio: float = _arg(0.1, "cosine decays to learning_rate * min_lr_ratio")
    warmup_steps: int = _arg(0, "linear warmup steps")
    weight_decay: float = _arg(0.1, "AdamW weight decay of matrices (not biases, norms)")
    adam_beta1: float = _arg(0.9, "AdamW beta1")
    adam_beta2: float = _arg(0.95, "AdamW beta2")
    max_grad_norm: float | None = _arg(1.0, "clip norm; none: no clipping (the norm is logged)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _arg(
        "auto", "auto: bf16 where supported, fp16 on older GPUs, fp32 on CPU"
    )
    torch_compile: bool = _arg(False, "torch.compile the model (checkpoints stay plain)")
    gradient_checkpointing: bool = _arg(False, "recompute activations in backward")
    eval_steps: int = _arg(0, "evaluate every N steps; 0: once, at the end")
    per_device_eval_batch_size: int = _arg(16, "evaluation batch size per process")
    eval_max_batches: int | None = _arg(None, "evaluate on the first N batches only")
    save_steps: int = _arg(0, "checkpoint every N steps (and at the end); 0: none")
    save_total_limit: int = _arg(2, "checkpoints kept")
    save_best_model: bool = _arg(False, "save_pretrained into output_dir/best on a new best loss")
    logging_steps: int = _arg(10, "log loss, lr, grad norm, throughput every N steps")
    seed: int = _arg(0, "seed of initialisation, data order and dropout")
    resume_from_checkpoint: bool | str = _arg(
        False, "resume from the latest checkpoint in output_dir, or PATH", "--resume"
    )
    # Resume although settings differ from the checkpoint's. The new values then hold from the
    # resumed step on: the lr schedule is rebuilt with the new peak/warmup/floor/length and read at
    # that step, AdamW's betas and weight decay are replaced, and the data position is converted
    # to batches of the new size (same epoch, same share of it done).
    allow_config_change: bool = _arg(False, "resume although settings differ from the checkpoint")
    disable_tqdm: bool = _arg(False, "no progress bar")
    # As TrainingArguments.report_to: "none" (default), "mlflow", "tensorboard" or "all". MLflow's
    # server comes from MLFLOW_TRACKING_URI (default: a SQLite store in output_dir).
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "trackers: none, mlflow, tensorboard or all (lmref.core.tracking)"},
    )
    run_name: str | None = _arg(None, "name of the tracked run; default: the tracker's own")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot make a sensible run."""
        if isinstance(self.report_to, str):  # report_to="mlflow", as TrainingArguments takes it
            self.report_to = [self.report_to]
        try:
            resolve_report_to(self.report_to)
        except ValueError as e:
            raise ValueError(f"TrainingConfig.{e}") from None
        at_least = {
            "max_steps": 1,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "per_device_eval_batch_size": 1,
            "logging_steps": 1,
            "save_total_limit": 1,
            "warmup_steps": 0,
            "eval_steps": 0,
            "save_steps": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"TrainingConfig.{name} must be an integer >= {low}, got {value!r}"
                )
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ValueError(
                f"TrainingConfig.eval_max_batches must be None or >= 1, "
                f"got {self.eval_max_batches!r}"
            )
        if not (isinstance(self.learning_rate, int | float) and self.learning_rate > 0):
            raise ValueError(
                f"TrainingConfig.learning_rate must be > 0, got {self.learning_rate!r}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"TrainingConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"TrainingConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm!r}"
            )
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(
                f"TrainingConfig.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}"
            )


# Settings that do not change the trained weights: they may differ on resume without a word.
BOOKKEEPING_FIELDS = frozenset(
    {
        "output_dir",
        "resume_from_checkpoint",
        "allow_config_change",
        "disable_tqdm",
        "logging_steps",
        "eval_steps",
        "per_device_eval_batch_size",
        "eval_max_batches",
        "save_steps",
        "save_total_limit",
        "save_best_model",
        "report_to",
        "run_name",
    }
)


@dataclass
class TrainResult:
    """The numbers of a run. ``peak_memory_mb`` is ``lmref.core.memory.PeakMemory``'s peak over
    the ``train()`` call (CUDA: allocated by torch; CPU: resident; None where unmeasurable)."""

    step: int
    train_loss: float
    eval_loss: float | None
    best_eval_loss: float | None
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    peak_memory_mb: float | None
    resumed_from_step: int = 0
    history: list[dict] = field(default_factory=list)
    run_id: str | None = None  # the MLflow run (report_to): its model is runs:/<run_id>/model


class ConfigChangeError(ValueError):
    """Resuming with settings that differ from the checkpoint's, without ``allow_config_change``."""


def check_config_change(
    saved: dict | None, config: TrainingConfig, world: int = 1, is_main: bool = True
) -> list[str]:
    """The settings (and world size) that differ from the checkpoint's, as ``"name: old -> new"``.

    Settings that only change what is logged or saved (``BOOKKEEPING_FIELDS``) are not compared.
    Raises ``ConfigChangeError`` listing them unless ``config.allow_config_change``; then warns and
    returns them, and ``train`` applies the new values from the resumed step on
    (``lmref.training.resume``).
    """
    if saved is None:
        return []
    now = {**asdict(config), "world_size": world}
    before = {**saved["training"], "world_size": saved["world_size"]}
    changes = [
        f"{k}: {before[k]!r} -> {now[k]!r}"
        for k in sorted(now)
        if k in before and k not in BOOKKEEPING_FIELDS and _differs(before[k], now[k])
    ]
    if changes and not config.allow_config_change:
        raise ConfigChangeError(
            "the checkpoint was written with other settings: "
            + "; ".join(changes)
            + ". Resume with the same settings, or set allow_config_change=True "
            "(--allow-config-change) to continue with the new ones."
        )
    if changes and is_main:
        warnings.warn("resuming with changed settings: " + "; ".join(changes), stacklevel=3)
    return changes


def _differs(a, b) -> bool:
    return json.loads(json.dumps(a)) != json.loads(json.dumps(b))  # tuples vs JSON lists
