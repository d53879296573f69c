"""Notebook 07's search problem: notebook 03's LoRA recipe as a search space, a short trial, and the
objective that the tuning workers import.

Usage::

    from lmref.lab import search_recipe
    from lmref import tuning

    study = tuning.run_study(search_recipe.lora_objective(steps=20), config, search_recipe.LORA_SPACE)
    model, run = search_recipe.lora_trial(search_recipe.LORA_DEFAULTS, steps=60)
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from lmref.lab.course import ensure_base, tokenized_instructions, train_on_instructions
from lmref.models.loading import load_model
from lmref.training.config import TrainingConfig, TrainResult
from lmref.training.lora import LoraSettings, add_lora
from lmref.tuning import Param, pruning_callback, suggest

# What notebook 07 searches: LoRA on the base (notebook 03's method), most important first (a
# grid gives its levels in this order). alpha is searched as alpha / r, the effective scale.
LORA_SPACE = [
    Param("learning_rate", 3e-4, 3e-2, log=True),
    Param("lora_r", choices=(4, 8, 16, 32)),
    Param("warmup_steps", 0, 10, integer=True),
    Param("batch_size", choices=(4, 8, 16)),
    Param("alpha_over_r", choices=(0.5, 1.0, 2.0, 4.0)),
]
# Notebook 03's choice, the point a search has to beat.
LORA_DEFAULTS = {
    "learning_rate": 5e-3,
    "lora_r": 16,
    "warmup_steps": 10,
    "batch_size": 16,
    "alpha_over_r": 2.0,
}


def lora_trial(
    params: dict,
    steps: int = 20,
    eval_examples: int = 128,
    report_every: int = 5,
    base_dir: Path | str | None = None,
    callbacks=(),
    seed: int = 0,
) -> tuple[torch.nn.Module, TrainResult]:
    """A short LoRA fine-tune of the base with ``params`` (the names of ``LORA_SPACE``).

    Returns the model and the run; ``result.eval_loss`` is the validation loss on the first
    ``eval_examples`` validation examples (answer tokens only, every task equally). Embeddings train too, as in notebook 03.
    """
    base_dir = str(base_dir or ensure_base())
    tokenized, collator = tokenized_instructions(base_dir)
    r = int(params["lora_r"])
    torch.manual_seed(seed)  # LoRA's A matrices start random: the same params, the same trial
    model = add_lora(
        load_model(base_dir),
        LoraSettings(
            r=r, alpha=params["alpha_over_r"] * r, dropout=0.0, modules_to_save=["embed_tokens"]
        ),
    )
    with tempfile.TemporaryDirectory(prefix="lmref-trial-") as out_dir:
        config = TrainingConfig(
            output_dir=out_dir,
            max_steps=steps,
            per_device_train_batch_size=int(params["batch_size"]),
            learning_rate=params["learning_rate"],
            warmup_steps=int(params["warmup_steps"]),
            weight_decay=0.0,
            logging_steps=report_every,
            per_device_eval_batch_size=32,
            eval_max_batches=max(1, eval_examples // 32),
            seed=seed,
            disable_tqdm=True,
        )
        result = train_on_instructions(model, tokenized, collator, config, callbacks)
    return model, result


def lora_objective(
    steps: int = 20, eval_examples: int = 128, report_every: int = 5, base_dir: str | None = None
) -> Callable[[optuna.Trial], float]:
    """``objective(trial)`` for ``lmref.tuning``: a short LoRA run, its validation loss, pruned
    on the training loss reported every ``report_every`` steps. Importable by workers as
    ``"lmref.lab.search_recipe:lora_objective"`` (with ``LORA_SPACE`` as ``"lmref.lab.search_recipe:LORA_SPACE"``)."""

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, LORA_SPACE)
        _, result = lora_trial(
            params,
            steps,
            eval_examples,
            report_every,
            base_dir,
            callbacks=[pruning_callback(trial, "loss")],
        )
        trial.set_user_attr("train_seconds", result.train_seconds)
        return result.eval_loss

    return objective
