"""Notebook 07's search problem: notebook 03's LoRA recipe as a search space, a short trial, and the
objective that the tuning workers import.

Every trial trains at the same batch size (``TRIAL_BATCH``) for the same number of steps, so all
trials see the same number of examples and their losses at a given step are comparable: that is
what a pruner compares. The objective and the pruning signal are both the validation loss on the
same first ``eval_examples`` validation rows (test is for the final numbers only).

Usage::

    from lmref.lab import search_recipe
    from lmref import tuning

    study = tuning.run_study(search_recipe.lora_objective(steps=8), config, search_recipe.LORA_SPACE)
    model, run = search_recipe.lora_trial(search_recipe.LORA_DEFAULTS, steps=120)
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
from lmref.training.loop import evaluate_loss
from lmref.training.lora import LoraSettings, add_lora
from lmref.tuning import Param, report, suggest

# What notebook 07 searches: LoRA on the base (notebook 03's method), most important first (a
# grid gives its levels in this order). alpha is searched as alpha / r, the scale of the update;
# warmup as a share of the run, so that a setting means the same in a short trial and a long run.
LORA_SPACE = [
    Param("learning_rate", 3e-4, 3e-2, log=True),
    Param("alpha_over_r", choices=(0.5, 1.0, 2.0, 4.0)),
    Param("lora_r", choices=(4, 8, 16, 32)),
    Param("warmup_share", 0.0, 0.3),
]
# Notebook 03's choice, the point a search has to beat: its learning rate, rank and alpha (32 =
# 2 x 16), and the warmup share it was chosen with (course.FINETUNE's 20 warmup steps over notebook 03's 240).
LORA_DEFAULTS = {
    "learning_rate": 5e-3,
    "alpha_over_r": 2.0,
    "lora_r": 16,
    "warmup_share": 20 / 240,
}
# Every trial and the confirmation runs use notebook 03's batch size.
TRIAL_BATCH = 16


def lora_trial(
    params: dict,
    steps: int = 8,
    eval_examples: int = 50,
    report_every: int = 0,
    on_validation: Callable[[int, float], None] | None = None,
    base_dir: Path | str | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, TrainResult]:
    """A LoRA fine-tune of the base with ``params`` (the names of ``LORA_SPACE``) for ``steps``
    steps of ``TRIAL_BATCH`` examples. Embeddings train too, as in notebook 03.

    Returns the model and the run; ``result.eval_loss`` is the loss on the answer tokens of the
    first ``eval_examples`` validation rows (stratified: every task equally). With
    ``report_every``, the same loss is also measured every ``report_every`` steps before the last
    and passed to ``on_validation(step, loss)`` (which may raise ``optuna.TrialPruned``).
    """
    base_dir = str(base_dir or ensure_base())
    tokenized, collator = tokenized_instructions(base_dir)
    r = int(params["lora_r"])
    torch.manual_seed(seed)  # LoRA's A matrices start random: the same params, the same trial
    settings = LoraSettings(
        r=r, alpha=params["alpha_over_r"] * r, dropout=0.0, modules_to_save=["embed_tokens"]
    )
    model = add_lora(load_model(base_dir), settings)  # add_lora quiets peft's FutureWarning
    callbacks = []
    if report_every and on_validation is not None:

        def validate(step: int, metrics: dict) -> None:
            if step % report_every == 0 and step < steps:  # the last step: the run's own eval
                on_validation(
                    step,
                    evaluate_loss(model, tokenized["validation"], eval_examples, collator, 1),
                )

        callbacks.append(validate)
    with tempfile.TemporaryDirectory(prefix="lmref-trial-") as out_dir:
        config = TrainingConfig(
            output_dir=out_dir,
            max_steps=steps,
            per_device_train_batch_size=TRIAL_BATCH,
            learning_rate=params["learning_rate"],
            warmup_steps=round(params["warmup_share"] * steps),
            weight_decay=0.0,
            logging_steps=steps,
            per_device_eval_batch_size=eval_examples,  # one batch: exactly these rows
            eval_max_batches=1,
            seed=seed,
            disable_tqdm=True,
        )
        result = train_on_instructions(model, tokenized, collator, config, callbacks)
    return model, result


def lora_objective(
    steps: int = 8, eval_examples: int = 50, report_every: int = 2, base_dir: str | None = None
) -> Callable[[optuna.Trial], float]:
    """``objective(trial)`` for ``lmref.tuning``: a short LoRA run, its validation loss. In a study
    with a pruner, the validation loss is also reported every ``report_every`` steps, so the
    pruner can stop the trial (a study without one skips those evaluations). Importable by
    workers as ``"lmref.lab.search_recipe:lora_objective"`` (with ``LORA_SPACE`` as
    ``"lmref.lab.search_recipe:LORA_SPACE"``)."""

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, LORA_SPACE)
        prunes = not isinstance(trial.study.pruner, optuna.pruners.NopPruner)
        _, result = lora_trial(
            params,
            steps,
            eval_examples,
            report_every if prunes else 0,
            lambda step, loss: report(trial, step, loss, "validation loss"),
            base_dir,
        )
        trial.set_user_attr("train_seconds", result.train_seconds)
        return result.eval_loss

    return objective
