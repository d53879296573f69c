"""Samplers compared at one budget, over several seeds: one search is one draw, so a sampler is
judged by the median and range of its seeds (``lmref.core.stats``), never by one lucky study.

- ``memoize``: a deterministic objective (seeded training) gives the same value for the same
  settings, so a repeated point is looked up instead of trained again. Across a comparison that
  is most of the grid's trials (every seed tries the same points, in another order) and the
  Bayesian samplers' random start-up trials (the same seeded draws as random search's first ones).
- ``run_samplers``: one study per sampler and seed, all at the same budget.
- ``curve_spreads``: the best-so-far curve of each seed, as a ``Spread`` (median, lowest,
  highest) after each trial; ``final_spread``: the best value each seed ended with.
- ``compare_best``: ``lmref.core.stats.compare`` for best values, in words that say which
  direction is better ("tpe better than random", or "within noise").

Usage::

    from lmref.tuning.comparison import (compare_best, curve_spreads, final_spread, memoize,
                                         run_samplers)

    objective = memoize(objective, space)
    studies = run_samplers(objective, space, ("random", "tpe"), (0, 1, 2), 12, "s.journal")
    tpe = [studies["tpe", seed] for seed in (0, 1, 2)]
    curve = curve_spreads(tpe, 12)        # [Spread after trial 1, ..., after trial 12]
    print(compare_best(final_spread(tpe), final_spread([studies["random", s] for s in (0, 1, 2)]),
                       ("tpe", "random")))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import optuna

from lmref.core.stats import Spread, compare
from lmref.tuning.space import Param, suggest
from lmref.tuning.study import StudyConfig, best_so_far, run_study


def memoize(
    objective: Callable[[optuna.Trial], float], space: Sequence[Param]
) -> Callable[[optuna.Trial], float]:
    """``objective`` with a memory: settings already evaluated return their stored value (the
    trial gets ``user_attrs["memoized"] = True``). Only for deterministic objectives; a pruned
    or failed trial stores nothing. The memory is ``memoized.values`` ({settings JSON: value})."""
    values: dict[str, float] = {}

    def memoized(trial: optuna.Trial) -> float:
        # Suggesting first fixes the trial's settings; the objective's own suggest calls of the
        # same parameters then return these values (Optuna keeps one value per name and trial).
        key = json.dumps(suggest(trial, space), sort_keys=True)
        if key in values:
            trial.set_user_attr("memoized", True)
            return values[key]
        values[key] = objective(trial)
        return values[key]

    memoized.values = values
    return memoized


def run_samplers(
    objective: Callable[[optuna.Trial], float],
    space: Sequence[Param],
    samplers: Sequence[str],
    seeds: Sequence[int],
    n_trials: int,
    storage: str,
    n_startup_trials: int = 4,
    prefix: str = "",
) -> dict[tuple[str, int], optuna.Study]:
    """One study per sampler and seed (named ``{prefix}{sampler}-{seed}``), each of
    ``n_trials`` trials, no pruning: ``{(sampler, seed): study}``."""
    studies = {}
    for sampler in samplers:
        for seed in seeds:
            config = StudyConfig(
                f"{prefix}{sampler}-{seed}",
                storage,
                sampler=sampler,
                seed=seed,
                n_trials=n_trials,
                n_startup_trials=n_startup_trials,
            )
            studies[sampler, seed] = run_study(objective, config, space)
    return studies


def curve_spreads(studies: Sequence[optuna.Study], n_trials: int) -> list[Spread]:
    """After each of ``n_trials`` trials, the ``Spread`` of the studies' best values so far.

    A study that stopped early (a grid smaller than the budget) keeps its last best value."""
    curves = []
    for study in studies:
        curve = best_so_far(study)[:n_trials]
        if not curve:
            raise ValueError(f"study {study.study_name!r} has no finished trial")
        curves.append(curve + curve[-1:] * (n_trials - len(curve)))
    return [Spread.of([curve[i] for curve in curves]) for i in range(n_trials)]


def final_spread(studies: Sequence[optuna.Study]) -> Spread:
    """The ``Spread`` of the studies' best values (one per seed)."""
    return Spread.of([study.best_value for study in studies])


def compare_best(
    a: Spread, b: Spread, names: tuple[str, str] = ("a", "b"), direction: str = "minimize"
) -> str:
    """``"<a> better than <b>"``, the reverse, or ``"within noise"``: ``lmref.core.stats.compare``
    (ranges over >= 3 seeds that do not overlap), with lower values better for ``minimize``."""
    verdict = compare(a, b, names)
    if verdict == "within noise":
        return verdict
    higher = names[0] if verdict == f"{names[0]} > {names[1]}" else names[1]
    lower = names[1] if higher == names[0] else names[0]
    better, worse = (lower, higher) if direction == "minimize" else (higher, lower)
    return f"{better} better than {worse}"
