"""Studies on Optuna: one budget, four samplers, pruning, resumable studies shared by workers.

The objective is any ``objective(trial) -> float`` the caller passes in (this stage trains
nothing itself); the space is a list of ``lmref.tuning.space.Param``. Around Optuna this adds:

- four samplers on the same space: ``grid`` (``grid_points``: cell centres, as many as the trial
  budget allows), ``random``, ``tpe`` (Bayesian optimisation with Parzen estimators) and ``gp``
  (Bayesian optimisation with a Gaussian process, Optuna's ``GPSampler``, on torch + scipy);
- pruning (``median`` or ``hyperband``) fed by ``report`` (one intermediate value; raises
  ``optuna.TrialPruned`` when the pruner says so) or ``pruning_callback``, a callback for a
  training loop that reports a metric of its logging steps;
- studies in storage on disk (Optuna's journal file by default, or any SQLAlchemy URL such as
  ``sqlite:///study.db`` or a PostgreSQL server shared by many machines), so a killed study
  resumes: ``run_study`` counts the finished trials and runs only the rest; trials left RUNNING
  by a dead worker on this host are marked FAILED and their parameters re-queued;
- a file lock around "count the trials, ask for one", so that several workers on one study
  (``lmref.tuning.workers``) stop at exactly ``n_trials`` on one machine;
- ``best_so_far`` and ``summarize`` for a study's curve and table;
- quiet output: Optuna's one INFO line per trial is off while ``run_study`` runs, and the
  samplers' known notices (experimental arguments, GP's missing optional ``greenlet``) are
  silenced where they are raised.

Usage::

    from lmref.tuning.space import Param, suggest
    from lmref.tuning.study import StudyConfig, best_so_far, pruning_callback, run_study

    space = [Param("learning_rate", 1e-4, 1e-2, log=True), Param("r", choices=(4, 8, 16))]

    def objective(trial):
        params = suggest(trial, space)
        result = train(..., callbacks=[pruning_callback(trial, "loss")])
        return result.eval_loss

    study = run_study(objective, StudyConfig("lora", "artifacts/studies/lora.journal",
                                             sampler="tpe", n_trials=16, pruner="median"), space)
    print(study.best_params, best_so_far(study))
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from lmref.tuning.space import Param, grid_points

SAMPLERS = ("grid", "random", "tpe", "gp")
PRUNERS = ("none", "median", "hyperband")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def make_sampler(
    name: str, space: Sequence[Param], budget: int, seed: int = 0, n_startup_trials: int = 4
) -> optuna.samplers.BaseSampler:
    """One of ``SAMPLERS``, seeded. Bayesian samplers start with ``n_startup_trials`` random ones.

    Optuna's default of 10 random start-up trials would make TPE and GP pure random search at a
    budget of 10; a small budget needs a short start-up.
    """
    if name == "grid":
        return optuna.samplers.GridSampler(grid_points(space, budget), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # multivariate, constant_liar and deterministic_objective are "experimental" arguments: each
    # construction warns so (ExperimentalWarning), which says nothing about this run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # constant_liar: a running trial counts as a bad result, so parallel workers spread out.
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=n_startup_trials, multivariate=True, constant_liar=True
            )
        if name == "gp":
            # Optuna's GP optimiser logs a WARNING on import when the optional 'greenlet' package
            # is missing (it then runs L-BFGS-B sequentially: slower suggestions, same results).
            logging.getLogger("optuna._gp.batched_lbfgsb").setLevel(logging.ERROR)
            return optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=n_startup_trials, deterministic_objective=True
            )
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


def make_pruner(
    name: str, max_resource: int = 100, min_resource: int = 1, n_startup_trials: int = 2
) -> optuna.pruners.BasePruner:
    """``median`` (stop a trial worse than the median of earlier trials at the same step, after
    ``min_resource`` steps) or ``hyperband`` (successive halving in several brackets)."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=n_startup_trials, n_warmup_steps=min_resource
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource=max_resource, reduction_factor=3
        )
    raise ValueError(f"unknown pruner {name!r}; choose one of {PRUNERS}")


def report(trial: optuna.Trial, step: int, value: float, name: str = "value") -> None:
    """Report ``value`` at ``step`` (an intermediate result: a validation loss after ``step``
    training steps) and raise ``optuna.TrialPruned`` when the study's pruner says this trial is
    not worth finishing. The pruner compares trials at the same step: report a signal that is
    comparable across trials (the same validation rows; steps of the same batch size)."""
    trial.report(float(value), step)
    if trial.should_prune():
        raise optuna.TrialPruned(f"pruned at step {step} ({name} {value:.4f})")


def pruning_callback(trial: optuna.Trial, key: str = "loss") -> Callable[[int, dict], None]:
    """A training-loop callback ``(step, metrics)``: ``report``s ``metrics[key]`` when present
    (the loop's logging steps), so the pruner may stop the run."""

    def callback(step: int, metrics: dict) -> None:
        value = metrics.get(key)
        if value is not None:
            report(trial, step, value, key)

    return callback


@dataclass
class StudyConfig:
    """Where a study lives and how it searches. ``storage``: a journal file path or a SQLAlchemy
    URL (``sqlite:///path.db``, ``postgresql://...``)."""

    name: str
    storage: str
    sampler: str = "tpe"
    n_trials: int = 20
    seed: int = 0
    pruner: str = "none"
    max_resource: int = 100  # steps of a full trial (for the pruner)
    min_resource: int = 1  # steps before a trial may be pruned
    n_startup_trials: int = 4
    direction: str = "minimize"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"StudyConfig.sampler: {self.sampler!r} is not one of {SAMPLERS}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"StudyConfig.pruner: {self.pruner!r} is not one of {PRUNERS}")
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"StudyConfig.direction: {self.direction!r} is not minimize/maximize")
        if self.n_trials < 1:
            raise ValueError(f"StudyConfig.n_trials must be >= 1, not {self.n_trials}")


def open_storage(storage: str | os.PathLike) -> BaseStorage:
    """A journal file (any path) or a relational database (a URL with ``://``)."""
    storage = str(storage)
    if "://" in storage:
        return RDBStorage(storage)
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


def _lock_path(storage: str) -> Path | None:
    """A lock file beside the storage, or None for a database server (no shared file)."""
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///") + ".workers.lock")
    if "://" in storage:
        return None
    return Path(storage + ".workers.lock")  # not ".lock": the journal's own lock uses that name


def open_study(config: StudyConfig, space: Sequence[Param], worker_id: int = 0) -> optuna.Study:
    """Create the study, or load it from its storage; refuses to resume with another setup.

    Workers get seeds ``seed + 1000 * worker_id`` so that two of them never draw the same points.
    """
    with _optuna_info_off():  # "A new study created ..." / "Using an existing study ..."
        return _open_study(config, space, worker_id)


def _open_study(config: StudyConfig, space: Sequence[Param], worker_id: int) -> optuna.Study:
    space_record = [asdict(p) for p in space]
    record = {
        "sampler": config.sampler,
        "direction": config.direction,
        "space": json.loads(json.dumps(space_record)),
    }
    study = optuna.create_study(
        study_name=config.name,
        storage=open_storage(config.storage),
        load_if_exists=True,
        direction=config.direction,
        sampler=make_sampler(
            config.sampler,
            space,
            config.n_trials,
            config.seed + 1000 * worker_id,
            config.n_startup_trials,
        ),
        pruner=make_pruner(config.pruner, config.max_resource, config.min_resource),
    )
    stored = study.user_attrs.get("setup")
    if stored is None:
        study.set_user_attr("setup", record)
    else:
        for key, value in record.items():
            if stored.get(key) != value:
                raise ValueError(
                    f"study {config.name!r} in {config.storage} was created with "
                    f"another {key} ({stored.get(key)!r}, now {value!r}): use a new "
                    "study name or storage"
                )
    return study


class _FileLock:
    """An exclusive ``flock`` on a file beside the storage (none for a database server);
    released by the OS if the holder dies, and safe to release twice."""

    def __init__(self, path: Path | None) -> None:
        self._file = open(path, "a") if path is not None else None  # noqa: SIM115 (held open)
        self._held = False

    def acquire(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if self._held and self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._held = False

    def close(self) -> None:
        self.release()
        if self._file is not None:
            self._file.close()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAILED the RUNNING trials whose worker (on this host) is gone; re-queue their params.

    A trial with no worker record was created by a worker killed between asking and recording,
    since ``run_study`` does both under the lock that callers of this function hold.
    """
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is not None and (worker["host"] != host or _process_alive(worker["pid"])):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        failed.append(t.number)
    return failed


def run_study(
    objective: Callable[[optuna.Trial], float],
    config: StudyConfig,
    space: Sequence[Param],
    worker_id: int = 0,
    on_trial: Callable[[FrozenTrial], None] | None = None,
) -> optuna.Study:
    """Run trials until the study holds ``config.n_trials`` finished ones (complete or pruned).

    Resumes a study already in storage, and shares it with other workers doing the same: under
    a file lock each worker recovers dead workers' trials, counts the finished and running
    trials, and asks for a new one only if the budget is not reached. The objective raises
    ``optuna.TrialPruned`` to prune; any other exception fails the trial and propagates.
    """
    with _optuna_info_off():
        return _run_trials(objective, config, space, worker_id, on_trial)


@contextlib.contextmanager
def _optuna_info_off() -> Iterator[None]:
    """Optuna logs every study created and every trial finished at INFO: hundreds of lines in a
    notebook that runs many short studies. Warnings stay on; the level is restored after."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _run_trials(
    objective: Callable[[optuna.Trial], float],
    config: StudyConfig,
    space: Sequence[Param],
    worker_id: int,
    on_trial: Callable[[FrozenTrial], None] | None,
) -> optuna.Study:
    study = open_study(config, space, worker_id)
    lock = _FileLock(_lock_path(config.storage))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "worker_id": worker_id}
    exhausted = getattr(study.sampler, "is_exhausted", None)

    def locked_objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", me)
        lock.release()  # the trial is created and claimed: other workers may now ask
        return objective(trial)

    callbacks = [lambda _, frozen: on_trial(frozen)] if on_trial is not None else []
    try:
        while True:
            lock.acquire()
            recover_dead_trials(study)
            taken = len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))
            if taken >= config.n_trials or (exhausted is not None and exhausted(study)):
                break
            # One trial per optimize() call, so Optuna itself records pruned and failed trials
            # and samplers may call study.stop() (the grid does when it is exhausted).
            study.optimize(locked_objective, n_trials=1, callbacks=callbacks)
            lock.release()
    finally:
        lock.close()
    return study


def best_so_far(study: optuna.Study) -> list[float]:
    """The best complete value after each finished trial, in trial order (nan before the first).

    Pruned trials use a slot of the budget but have no final value, so they carry the best on.
    """
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    best, curve = math.inf, []
    for t in sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            best = min(best, sign * t.value)
        curve.append(sign * best if best < math.inf else math.nan)
    return curve


def trial_seconds(trial: FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def summarize(study: optuna.Study) -> dict:
    """Counts, seconds and the best trial of a study, for a table."""
    trials = study.get_trials(deepcopy=False)
    by_state = {s.name.lower(): [t for t in trials if t.state == s] for s in TrialState}
    complete = by_state["complete"]
    best = (
        (min if study.direction == optuna.study.StudyDirection.MINIMIZE else max)(
            complete, key=lambda t: t.value
        )
        if complete
        else None
    )
    return {
        "study": study.study_name,
        "trials": len(trials),
        **{state: len(ts) for state, ts in by_state.items() if state != "waiting"},
        "seconds": sum(trial_seconds(t) for t in trials),
        "pruned_seconds": sum(trial_seconds(t) for t in by_state["pruned"]),
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else None,
    }
