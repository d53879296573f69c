"""A study's trials as MLflow runs: one parent run per study, one nested run per finished trial
with its params, value, state (complete, pruned, failed), intermediate values and seconds.

``MlflowTrialLogger`` is an ``on_trial`` callback for ``run_study`` (or, through ``as_callback``,
a callback for ``study.optimize``). Optuna's own ``MLflowCallback`` lives in the separate
``optuna-integration`` package and logs through the fluent ``mlflow.start_run``, whose
process-wide active run collides with a training run tracked in the same process; these few
lines with ``MlflowClient`` and explicit run ids avoid both the extra package and the global.
A trial's runs nest under the study's parent run (MLflow's ``mlflow.parentRunId`` tag) and
carry the study's name (``optuna.study``), so the MLflow UI groups them either way.

Usage::

    from lmref.tuning.study import StudyConfig, run_study
    from lmref.tuning.tracking import MlflowTrialLogger

    logger = MlflowTrialLogger("lora", tracking_uri="http://127.0.0.1:5000")
    study = run_study(objective, StudyConfig("lora", "lora.journal", n_trials=8), space,
                      on_trial=logger)
    logger.parent_run_id, logger.run_ids          # the study's run; trial number -> run id
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial

from lmref.core.tracking import experiment_id, mlflow_client


class MlflowTrialLogger:
    """Logs each finished trial it is given as a run nested under one parent run of the study.

    ``tracking_uri``: as ``lmref.core.tracking.resolve_tracking_uri`` (argument, then
    ``MLFLOW_TRACKING_URI``, then a SQLite store in ``output_dir``)."""

    def __init__(
        self,
        study_name: str,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        output_dir: str | os.PathLike = ".",
    ) -> None:
        self.study_name = study_name
        self.client = mlflow_client(output_dir, tracking_uri)
        self.experiment_id = experiment_id(self.client, output_dir, experiment)
        self.parent_run_id: str | None = None
        self.run_ids: dict[int, str] = {}

    def __call__(self, trial: FrozenTrial) -> None:
        from mlflow.entities import Metric, Param

        parent = self._parent()
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.study_name}-trial-{trial.number}",
            tags={
                "mlflow.parentRunId": parent,
                "optuna.study": self.study_name,
                "optuna.trial": str(trial.number),
                "optuna.state": trial.state.name.lower(),
                "lmref.run_kind": "trial",
            },
        )
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [
            Metric("intermediate", float(v), now, int(s))
            for s, v in trial.intermediate_values.items()
        ]
        # A complete trial's value only: Optuna gives a pruned trial its last intermediate value,
        # which a table of values would rank beside results it never reached.
        if trial.state == optuna.trial.TrialState.COMPLETE:
            metrics.append(Metric("value", float(trial.value), now, trial.number))
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
            metrics.append(Metric("seconds", seconds, now, 0))
        params = [Param(k, str(v)) for k, v in sorted(trial.params.items())]
        self.client.log_batch(run_id, metrics=metrics, params=params)
        status = "FAILED" if trial.state == optuna.trial.TrialState.FAIL else "FINISHED"
        self.client.set_terminated(run_id, status)
        self.client.set_terminated(parent)  # its end time: the last trial's
        self.run_ids[trial.number] = run_id

    def as_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        """The ``(study, trial)`` form ``study.optimize(callbacks=...)`` takes."""
        return lambda _study, trial: self(trial)

    def _parent(self) -> str:
        if self.parent_run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.study_name,
                tags={"optuna.study": self.study_name, "lmref.run_kind": "study"},
            )
            self.parent_run_id = run.info.run_id
        return self.parent_run_id
