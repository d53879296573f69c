"""Hyperparameter search costs: Optuna's overhead per trial, and the speed-up of 2 workers over 1.

1. Overhead: studies of a free objective (a formula of the parameters, no training) over the
   course's LoRA search space, so every second measured is the sampler + storage + lmref's
   worker bookkeeping (file lock, dead-trial recovery, counting). Each sampler runs with the
   journal file on disk (what the notebook uses) and, for reference, Optuna's in-memory storage
   through plain ``study.optimize``.
2. Workers: the course's real LoRA trial (``lmref.lab.search_recipe:lora_objective``, a short
   fine-tune of the base on the instruction set) run by 1 worker process and by 2, same trial
   count, random sampler's settings queued in advance so both runs train the same trials,
   ``OMP_NUM_THREADS=1`` per process; wall time including process start-up, and trials per second
   between the first trial's start and the last one's end. Each is repeated (``--repeats``): the
   speed-ups are reported as the median and range of the repeats (``lmref.core.stats.Spread``).

    python benchmarks/tuning_overhead.py     # writes benchmarks/results/tuning_overhead-<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import optuna
import torch

from lmref import tuning
from lmref.core.stats import Spread
from lmref.lab import course, search_recipe
from lmref.lab.env import cpu_model
from lmref.tuning import StudyConfig

RESULTS = Path(__file__).resolve().parent / "results"


def free_objective(trial: optuna.Trial) -> float:
    p = tuning.suggest(trial, search_recipe.LORA_SPACE)
    return (
        abs(p["learning_rate"] - 3e-3) * 100
        + p["warmup_share"]
        + 8 / p["lora_r"]
        + abs(p["alpha_over_r"] - 2)
    )


def overhead(sampler: str, n_trials: int, folder: Path) -> dict:
    config = StudyConfig(
        f"overhead-{sampler}",
        str(folder / f"{sampler}.journal"),
        sampler=sampler,
        n_trials=n_trials,
        n_startup_trials=4,
    )
    start = time.perf_counter()
    study = tuning.run_study(free_objective, config, search_recipe.LORA_SPACE)
    journal = (time.perf_counter() - start) / len(study.trials)
    memory = optuna.create_study(
        sampler=tuning.make_sampler(sampler, search_recipe.LORA_SPACE, n_trials)
    )
    start = time.perf_counter()
    memory.optimize(free_objective, n_trials=n_trials)
    in_memory = (time.perf_counter() - start) / len(memory.trials)
    return {
        "sampler": sampler,
        "trials": len(study.trials),
        "ms_per_trial_journal_lmref": journal * 1e3,
        "ms_per_trial_in_memory": in_memory * 1e3,
    }


def queued_params(n_trials: int) -> list[dict]:
    """The same settings for every worker count (trials of other ranks cost differently)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return [tuning.suggest(study.ask(), search_recipe.LORA_SPACE) for _ in range(n_trials)]


def workers(n_workers: int, n_trials: int, steps: int, folder: Path, repeat: int = 0) -> dict:
    config = StudyConfig(
        f"workers-{n_workers}-{repeat}",
        str(folder / f"workers-{n_workers}-{repeat}.journal"),
        sampler="random",
        n_trials=n_trials,
    )
    study = tuning.open_study(config, search_recipe.LORA_SPACE)
    for params in queued_params(n_trials):
        study.enqueue_trial(params)
    run = tuning.run_workers(
        n_workers,
        config,
        "lmref.lab.search_recipe:LORA_SPACE",
        "lmref.lab.search_recipe:lora_objective",
        {"steps": steps},
        threads_per_worker=1,
    )
    study = optuna.load_study(study_name=config.name, storage=tuning.open_storage(config.storage))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    busy = (last - first).total_seconds()
    return {
        "workers": n_workers,
        "repeat": repeat,
        "trials": len(trials),
        "wall_seconds": run["seconds"],
        "trials_seconds": busy,
        "trials_per_second": len(trials) / busy,
        "mean_trial_seconds": sum(tuning.trial_seconds(t) for t in trials) / len(trials),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overhead-trials", type=int, default=40)
    parser.add_argument("--worker-trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20, help="training steps of one LoRA trial")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each worker count")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    course.ensure_base()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        per_sampler = [overhead(s, args.overhead_trials, folder) for s in tuning.SAMPLERS]
        for row in per_sampler:
            print(row, flush=True)
        scaling = []
        for repeat in range(args.repeats):  # 1 and 2 workers alternate: drifting load hits both
            for n in (1, 2):
                scaling.append(workers(n, args.worker_trials, args.steps, folder, repeat))
                print(scaling[-1], flush=True)
    one = [row for row in scaling if row["workers"] == 1]
    two = [row for row in scaling if row["workers"] == 2]
    report = {
        "benchmark": "tuning_overhead",
        "device": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "search_space": [p.name for p in search_recipe.LORA_SPACE],
        "overhead": per_sampler,
        "workers": scaling,
        # Repeat i of 1 worker against repeat i of 2: runs that were close in time.
        "speedup_2_workers_wall": asdict(
            Spread.of([a["wall_seconds"] / b["wall_seconds"] for a, b in zip(one, two)])
        ),
        "speedup_2_workers_trials": asdict(
            Spread.of([b["trials_per_second"] / a["trials_per_second"] for a, b in zip(one, two)])
        ),
        "note": "OMP_NUM_THREADS=1 per worker; other jobs may share the cores, see the README",
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"tuning_overhead-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k.startswith("speedup")}, indent=1))


if __name__ == "__main__":
    main()
