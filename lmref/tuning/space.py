"""A search space: ``Param`` (one hyperparameter), ``suggest`` (ask a trial for all of them) and
``grid_points`` (a grid of at most a trial budget, for Optuna's ``GridSampler``).

The same space serves every sampler of ``lmref.tuning.study``: ``grid`` cuts each range into
cells and takes their centres, as many as the trial budget allows; ``random``, ``tpe`` and ``gp``
draw from the ranges themselves.

Usage::

    from lmref.tuning.space import Param, grid_points, suggest

    space = [Param("learning_rate", 1e-4, 1e-2, log=True), Param("r", choices=(4, 8, 16))]
    grid_points(space, 6)    # {"learning_rate": [0.000215, 0.001, 0.00464], "r": [4, 16]}

    def objective(trial):
        params = suggest(trial, space)   # {"learning_rate": ..., "r": ...}
        ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna


@dataclass(frozen=True)
class Param:
    """One hyperparameter: a float or int range (``log`` for scales like learning rates), or
    ``choices`` (ordered values such as ranks or batch sizes, or unordered categories)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if not self.choices:
                raise ValueError(f"parameter {self.name!r}: choices is empty")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(
                f"parameter {self.name!r} needs low < high or choices "
                f"(got low={self.low!r}, high={self.high!r})"
            )
        if self.log and self.low <= 0:
            raise ValueError(
                f"parameter {self.name!r}: a log range needs low > 0, not {self.low!r}"
            )

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def grid(self, levels: int) -> list:
        """``levels`` values: the centres of equal cells of the range (log cells for ``log``).

        Centres, not ends: a 2-point grid over a learning rate range tries 1/4 and 3/4 of the
        way (on the log scale), not its two extremes.
        """
        if self.choices is not None:
            picks = [int((i + 0.5) * len(self.choices) / levels) for i in range(levels)]
            return list(dict.fromkeys(self.choices[p] for p in picks))
        low, high = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        values = [low + (i + 0.5) * (high - low) / levels for i in range(levels)]
        values = [math.exp(v) for v in values] if self.log else values
        if self.integer:
            return list(dict.fromkeys(int(round(v)) for v in values))
        return [float(f"{v:.3g}") for v in values]

    def max_levels(self) -> int:
        if self.choices is not None:
            return len(self.choices)
        return int(self.high - self.low) + 1 if self.integer and not self.log else 1_000_000


def suggest(trial: optuna.Trial, space: Sequence[Param]) -> dict[str, Any]:
    """Ask ``trial`` for every parameter of ``space``; returns ``{name: value}``."""
    return {p.name: p.suggest(trial) for p in space}


def grid_points(space: Sequence[Param], budget: int) -> dict[str, list]:
    """A grid over ``space`` of at most ``budget`` points, for ``optuna.samplers.GridSampler``.

    Levels go to the parameters in the order given (put the one that matters most first): each
    round adds a level to a parameter while the product stays within the budget. Parameters left
    at one level sit at the centre of their range.
    """
    if budget < 1:
        raise ValueError(f"a grid needs a budget of at least 1 trial, not {budget}")
    levels = [1] * len(space)
    grown = True
    while grown:
        grown = False
        for i, p in enumerate(space):
            bigger = levels[:i] + [levels[i] + 1] + levels[i + 1 :]
            if levels[i] < p.max_levels() and math.prod(bigger) <= budget:
                levels, grown = bigger, True
    return {p.name: p.grid(n) for p, n in zip(space, levels)}
