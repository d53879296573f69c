"""Several worker processes on one Optuna study: the worker's command line, a launcher that
starts N of them and waits, and the worker itself (``python -m lmref.tuning``).

Workers share the study through its storage (see ``lmref.tuning.study.run_study``): a file lock
makes workers on one machine stop at exactly ``n_trials``; across machines (no shared lock) they
may overshoot by at most one trial per worker. A worker finds the search space and the objective
by ``"module:attribute"`` references, since a function cannot be passed to another process.

``run_workers`` reads every worker's output while they run (``lmref.core.processes.run_logged``
in one thread per worker): a worker that prints more than a pipe holds (64 KiB) never waits on
the launcher.

Usage::

    from lmref.tuning import StudyConfig, run_workers

    config = StudyConfig("lora", "artifacts/studies/lora.journal", sampler="tpe", n_trials=16)
    run = run_workers(2, config, "mypkg.search:SPACE", "mypkg.search:make_objective",
                      {"steps": 40})
    print(run["seconds"], run["outputs"][0])

    # or one worker by hand on each machine, on a storage they all reach:
    # python -m lmref.tuning --config '{"name": "lora", "storage": "postgresql://...", ...}' \\
    #     --space mypkg.search:SPACE --objective mypkg.search:make_objective --worker-id 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import optuna

from lmref.core.processes import RunLog, run_logged
from lmref.tuning.study import FINISHED, StudyConfig, run_study

# The package's __main__ runs main(): "python -m lmref.tuning.workers" would work too, but runpy
# warns when a package's __init__ has already imported the module it is asked to run.
WORKER_MODULE = "lmref.tuning"


def load_reference(reference: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (how workers find space and objective)."""
    module, _, attribute = reference.partition(":")
    if not module or not attribute:
        raise ValueError(f"expected 'module:attribute', got {reference!r}")
    return getattr(importlib.import_module(module), attribute)


def worker_command(
    config: StudyConfig,
    space: str,
    objective: str,
    objective_kwargs: Mapping[str, Any] | None = None,
    worker_id: int = 0,
) -> list[str]:
    """The command line of one worker process (``python -m lmref.tuning ...``)."""
    return [
        sys.executable,
        "-m",
        WORKER_MODULE,
        "--config",
        json.dumps(asdict(config)),
        "--space",
        space,
        "--objective",
        objective,
        "--objective-kwargs",
        json.dumps(dict(objective_kwargs or {})),
        "--worker-id",
        str(worker_id),
    ]


def run_workers(
    n_workers: int,
    config: StudyConfig,
    space: str,
    objective: str,
    objective_kwargs: Mapping[str, Any] | None = None,
    threads_per_worker: int = 1,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> dict:
    """Start ``n_workers`` processes on one study and wait for them all.

    ``space`` and ``objective`` are ``"module:attribute"`` references; the objective attribute is
    a factory called with ``objective_kwargs`` that returns ``objective(trial)``. Each process gets
    ``threads_per_worker`` threads (OMP/MKL), so N workers do not oversubscribe the cores.
    ``timeout`` (seconds, for all of them together) ends any worker still running then.

    Returns ``{"workers", "seconds" (wall), "outputs" (each worker's merged stdout/stderr)}``;
    raises ``RuntimeError`` with each failed worker's log tail (and its stacks on a timeout).
    """
    threads = str(threads_per_worker)
    child_env = {**(env or {}), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    started: list[subprocess.Popen] = []
    started_lock = threading.Lock()
    stopping = threading.Event()

    def keep(process: subprocess.Popen) -> None:
        with started_lock:
            started.append(process)
            if stopping.is_set():  # started just after an interrupt: it goes too
                process.kill()

    def run_one(worker_id: int) -> RunLog:
        # One reader per worker, all at once: reading the pipes one after another let a worker
        # that filled its pipe block until every worker before it had exited.
        return run_logged(
            worker_command(config, space, objective, objective_kwargs, worker_id),
            timeout_s=math.inf if timeout is None else timeout,
            env=child_env,
            echo=False,
            on_start=keep,
        )

    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="tuning-worker")
    try:
        logs = list(pool.map(run_one, range(n_workers)))
    except BaseException:  # an interrupted notebook cell leaves no worker on the study
        with started_lock:
            stopping.set()
            for process in started:
                if process.poll() is None:
                    process.kill()
        raise
    finally:
        pool.shutdown(wait=True)
    seconds = time.perf_counter() - start
    failed = []
    for worker_id, log in enumerate(logs):
        try:
            log.check()
        except RuntimeError as error:
            failed.append(f"worker {worker_id}: {error}")
    if failed:
        raise RuntimeError("worker(s) failed:\n" + "\n".join(failed))
    return {"workers": n_workers, "seconds": seconds, "outputs": [log.output for log in logs]}


def main(argv: Sequence[str] | None = None) -> None:
    """One worker: run trials of the study until its budget is reached, then print a JSON line."""
    parser = argparse.ArgumentParser(description="One worker of an Optuna study (lmref.tuning).")
    parser.add_argument("--config", required=True, help="StudyConfig as JSON")
    parser.add_argument("--space", required=True, help="module:attribute, a list of Param")
    parser.add_argument(
        "--objective",
        required=True,
        help="module:factory; factory(**objective_kwargs) returns objective(trial)",
    )
    parser.add_argument("--objective-kwargs", default="{}")
    parser.add_argument("--worker-id", type=int, default=0)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = StudyConfig(**json.loads(args.config))
    objective = load_reference(args.objective)(**json.loads(args.objective_kwargs))
    study = run_study(
        objective,
        config,
        load_reference(args.space),
        args.worker_id,
        on_trial=lambda t: print(f"trial {t.number} {t.state.name} {t.value}", flush=True),
    )
    print(
        json.dumps(
            {
                "worker_id": args.worker_id,
                "pid": os.getpid(),
                "finished": len(study.get_trials(deepcopy=False, states=FINISHED)),
            }
        )
    )
