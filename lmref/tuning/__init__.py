"""Tuning stage: hyperparameter search on Optuna (samplers, pruners, resumable studies,
parallel workers). Imports ``lmref.core`` only: the objective is the caller's.

``space`` (Param, suggest, grid_points), ``study`` (samplers, pruners, StudyConfig, storage,
run_study, report, summaries), ``comparison`` (samplers over several seeds: memoize,
run_samplers, curve_spreads, final_spread, compare_best) and ``workers`` (run_workers;
``python -m lmref.tuning`` is one worker). Their public names are re-exported here.

Usage::

    from lmref import tuning

    study = tuning.run_study(objective, tuning.StudyConfig("s", "s.journal"), space)
"""

from lmref.tuning.comparison import (
    compare_best,
    curve_spreads,
    final_spread,
    memoize,
    run_samplers,
)
from lmref.tuning.space import Param, grid_points, suggest
from lmref.tuning.study import (
    FINISHED,
    PRUNERS,
    SAMPLERS,
    StudyConfig,
    best_so_far,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    pruning_callback,
    recover_dead_trials,
    report,
    run_study,
    summarize,
    trial_seconds,
)
from lmref.tuning.workers import load_reference, run_workers, worker_command

__all__ = [
    "FINISHED",
    "PRUNERS",
    "SAMPLERS",
    "Param",
    "StudyConfig",
    "best_so_far",
    "compare_best",
    "curve_spreads",
    "final_spread",
    "grid_points",
    "load_reference",
    "make_pruner",
    "make_sampler",
    "memoize",
    "open_storage",
    "open_study",
    "pruning_callback",
    "recover_dead_trials",
    "report",
    "run_samplers",
    "run_study",
    "run_workers",
    "suggest",
    "summarize",
    "trial_seconds",
    "worker_command",
]
