"""Experiment tracking, as Hugging Face ``Trainer`` users know it: ``report_to`` picks the
trackers ("none", the default; "mlflow"; "tensorboard"; "all"), and each run records its
params, its metrics by step, its final model folder and its lineage (``lmref.core.lineage``).

- ``MlflowTracker``: a run in the tracking server named by the argument, else
  ``MLFLOW_TRACKING_URI``, else the embedded default: MLflow's own SQLite store, placed in the
  output folder (``<output_dir>/mlflow.db``, artifacts in ``<output_dir>/mlartifacts``).
  The experiment is ``MLFLOW_EXPERIMENT_NAME`` or "lmref". ``MlflowClient`` with an explicit
  run id, not the fluent ``mlflow.start_run``: no process-wide "active run" that a study's
  nested runs or a notebook's second run would trip over.
- ``TensorBoardTracker``: ``torch.utils.tensorboard.SummaryWriter`` into
  ``<output_dir>/runs/<run_name>``; params and lineage as a text summary.
- ``Trackers``: several as one; ``track_run`` is the with-block the training loop uses (a no-op
  tracker when ``report_to`` is none or this is not rank 0; the run ends FAILED on an error).

Quiet output (a notebook sets these before training): ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=1``
drops MLflow's "View run ... at" lines, ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false`` its upload
bars, ``MLFLOW_LOGGING_LEVEL=WARNING`` its INFO lines (a new store's "Creating initial MLflow
database tables..."); ``quiet_mlflow()`` sets the three (unless already set) and the levels.

Usage::

    from lmref.core.tracking import log_model_folder, quiet_mlflow, track_run

    quiet_mlflow()
    with track_run(["mlflow"], "artifacts/run", params=asdict(config), tags=lineage(...)) as t:
        t.log_metrics({"loss": 2.3}, step=10)
        t.log_model("artifacts/run/final")            # artifact "model": runs:/<t.run_id>/model
    log_model_folder(t.run_id, "artifacts/run/final", output_dir="artifacts/run")  # run ended
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPORT_TO = ("none", "mlflow", "tensorboard", "all")
TRACKERS = ("mlflow", "tensorboard")
DEFAULT_EXPERIMENT = "lmref"
MODEL_ARTIFACT = "model"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value; the full recipe is an artifact too


def resolve_report_to(report_to: str | Sequence[str] | None) -> list[str]:
    """The trackers ``report_to`` names, in ``TRACKERS`` order; ``[]`` for none. Raises
    ``ValueError`` naming an unknown value."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to: {unknown} not among {list(REPORT_TO)}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to: 'none' cannot be combined with others, got {names}")
    return [t for t in TRACKERS if t in names or "all" in names]


def resolve_tracking_uri(output_dir: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """The argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlflow.db``."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"


def quiet_mlflow() -> None:
    """Turn off MLflow's per-run URL lines, upload progress bars and INFO logging (its database
    migrations log a dozen lines the first time a store is opened)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    import mlflow  # noqa: F401  (it sets its loggers' levels on import: set them after)

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def mlflow_client(output_dir: str | os.PathLike, tracking_uri: str | None = None):
    """An ``MlflowClient`` on ``resolve_tracking_uri``; the embedded store's folder is made."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(output_dir, tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, output_dir: str | os.PathLike, name: str | None = None) -> str:
    """The id of experiment ``name`` (``MLFLOW_EXPERIMENT_NAME``, else "lmref"), created if
    missing; in a local SQLite store its artifacts go beside the database, not into the cwd."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        location = (Path(output_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


class MlflowTracker:
    """One MLflow run: ``start``, ``log_metrics``, ``log_model``, ``end``."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        experiment: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.client = mlflow_client(output_dir, tracking_uri)
        self.experiment_id = experiment_id(self.client, output_dir, experiment)
        self.run_id: str | None = None

    def start(self, run_name: str | None, params: dict, tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        flat = [Param(k, _text(v)[:MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=flat[i : i + 100])
        self.client.log_dict(self.run_id, _jsonable(params), "recipe.json")
        self.client.log_batch(self.run_id, tags=[RunTag("lmref.run_kind", "training")])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in _numbers(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_model(self, folder: str | os.PathLike) -> None:
        self.client.log_artifacts(self.run_id, str(folder), MODEL_ARTIFACT)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class TensorBoardTracker:
    """Event files under ``<output_dir>/runs/<run_name>`` (``log_dir``), one scalar per metric."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.log_dir: Path | None = None
        self.run_id: str | None = None
        self._writer = None

    def start(self, run_name: str | None, params: dict, tags: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        name = run_name or time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = self.output_dir / "runs" / name
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._writer.add_text("recipe", _markdown_json(_jsonable(params)))
        self._writer.add_text("lineage", _markdown_json(tags))

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in _numbers(metrics).items():
            self._writer.add_scalar(key, value, step)

    def log_model(self, folder: str | os.PathLike) -> None:
        self._writer.add_text("model", str(Path(folder).resolve()))  # TensorBoard keeps no files

    def end(self, status: str = "FINISHED") -> None:
        self._writer.add_text("status", status)
        self._writer.close()


class Trackers:
    """Several trackers as one (none at all: every call does nothing). ``run_id``: MLflow's."""

    def __init__(self, trackers: Sequence = ()) -> None:
        self.trackers = list(trackers)

    @property
    def run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if isinstance(t, MlflowTracker)), None)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, run_name: str | None, params: dict, tags: dict[str, str]) -> None:
        for t in self.trackers:
            t.start(run_name, params, tags)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_model(self, folder: str | os.PathLike) -> None:
        for t in self.trackers:
            t.log_model(folder)

    def end(self, status: str = "FINISHED") -> None:
        for t in self.trackers:
            t.end(status)


def make_trackers(
    report_to: str | Sequence[str] | None,
    output_dir: str | os.PathLike,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> Trackers:
    """The trackers ``report_to`` names (none started yet)."""
    made = []
    for name in resolve_report_to(report_to):
        if name == "mlflow":
            made.append(MlflowTracker(output_dir, tracking_uri, experiment))
        else:
            made.append(TensorBoardTracker(output_dir))
    return Trackers(made)


@contextmanager
def track_run(
    report_to: str | Sequence[str] | None,
    output_dir: str | os.PathLike,
    run_name: str | None = None,
    params: dict | None = None,
    tags: dict[str, str] | Callable[[], dict[str, str]] | None = None,
    enabled: bool = True,
    tracking_uri: str | None = None,
) -> Iterator[Trackers]:
    """A started run for the block, ended FINISHED (FAILED on an exception, KILLED on Ctrl-C).

    ``tags`` may be a function (``lineage`` hashes the data: not worth it when nothing
    tracks). ``enabled=False`` (other ranks than 0) yields an empty ``Trackers``."""
    trackers = make_trackers(report_to if enabled else None, output_dir, tracking_uri)
    if trackers:
        tags = tags() if callable(tags) else dict(tags or {})
        trackers.start(run_name, dict(params or {}), tags)
    try:
        yield trackers
    except KeyboardInterrupt:
        trackers.end("KILLED")
        raise
    except BaseException:
        trackers.end("FAILED")
        raise
    trackers.end("FINISHED")


def log_model_folder(
    run_id: str,
    folder: str | os.PathLike,
    output_dir: str | os.PathLike = ".",
    tracking_uri: str | None = None,
) -> str:
    """Upload ``folder`` as artifact ``model`` of run ``run_id`` (an ended run too: the command
    line saves its final folder after ``train`` returns); returns ``runs:/<run_id>/model``."""
    mlflow_client(output_dir, tracking_uri).log_artifacts(run_id, str(folder), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


# ---------------------------------------------------------------- helpers


def _numbers(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, ``step`` left out (it is the x axis)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step"
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(_jsonable(value))


def _markdown_json(value) -> str:
    return "```\n" + json.dumps(value, indent=1, sort_keys=True) + "\n```"  # TensorBoard: markdown
