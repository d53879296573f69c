"""Experiment tracking against a real MLflow server (``lmref.lab.lifecycle_servers.start_mlflow``):
a tracked tiny training run's params, metrics by step, lineage tags and model artifact; a
failed run's status; TensorBoard event files read back; an Optuna study's trials as runs; and
``report_to="none"`` leaving the server alone. One server and one tracked run for the module.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import optuna
import pytest
import torch

from lmref.core.hashing import sha256_of
from lmref.core.manifest import MANIFEST, verify_manifest
from lmref.lab.lifecycle_servers import start_mlflow
from lmref.lab.services import Services

pytestmark = pytest.mark.integration

mlflow = pytest.importorskip("mlflow")

STEPS, LOG_EVERY = 4, 2


@pytest.fixture(scope="module")
def server():
    from lmref.core.tracking import quiet_mlflow

    with pytest.MonkeyPatch.context() as mp, Services() as services:
        # What quiet_mlflow() would set, set here so that the module's end restores them.
        mp.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "1")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")
        quiet_mlflow()
        url = services.add(start_mlflow()).url
        mp.setenv("MLFLOW_TRACKING_URI", url)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-tracking")
        yield url


@pytest.fixture(scope="module")
def data():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(0, 300, (24, 16), generator=g).tolist()})


def _train(tiny_model_dir, data, out, report_to, **kw):
    from transformers import AutoModelForCausalLM

    from lmref.training.config import TrainingConfig
    from lmref.training.loop import train

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = TrainingConfig(
        output_dir=str(out),
        max_steps=STEPS,
        logging_steps=LOG_EVERY,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        disable_tqdm=True,
        report_to=report_to,
        run_name="tiny-tracked",
    )
    return train(
        model, data, config, eval_dataset=data.select(range(8)), final_dir=out / "final", **kw
    )


@pytest.fixture(scope="module")
def tracked(server, tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    result = _train(tiny_model_dir, data, out, ["mlflow"])
    client = mlflow.MlflowClient(server)
    return result, client.get_run(result.run_id), client, out


def test_run_has_the_recipe_as_params(tracked):
    result, run, client, out = tracked
    params = run.data.params
    assert params["max_steps"] == str(STEPS)
    assert float(params["learning_rate"]) == 1e-3
    assert json.loads(params["report_to"]) == ["mlflow"]
    assert run.info.run_name == "tiny-tracked" and run.info.status == "FINISHED"
    recipe = client.download_artifacts(result.run_id, "recipe.json", str(out))
    assert json.loads(open(recipe).read())["per_device_train_batch_size"] == 4


def test_run_has_the_loops_metrics_at_its_steps(tracked):
    result, run, client, _ = tracked
    logged = [h for h in result.history if "loss" in h]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [h["step"] for h in logged] == [2, 4], key
        assert [m.value for m in history] == pytest.approx([h[key] for h in logged]), key
    (evaluated,) = client.get_metric_history(result.run_id, "eval_loss")
    assert evaluated.step == STEPS and evaluated.value == pytest.approx(result.eval_loss)


def test_run_carries_its_lineage(tracked, data, tiny_model_dir):
    _, run, _, _ = tracked
    tags = run.data.tags
    # The data fingerprint, computed here from the rows: lengths then values, as int64.
    rows = data["input_ids"]
    digest = hashlib.sha256(np.array([len(r) for r in rows], dtype=np.int64).tobytes())
    digest.update(np.concatenate([np.array(r, dtype=np.int64) for r in rows]).tobytes())
    assert tags["lmref.data_fingerprint"] == digest.hexdigest()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert tags["lmref.git_commit"] == tags["mlflow.source.git.commit"] == head.strip()
    assert tags["lmref.git_dirty"] in ("true", "false")
    assert tags["lmref.parent_model"] == str(tiny_model_dir.resolve())
    assert tags["lmref.parent_manifest_sha256"] == sha256_of(tiny_model_dir / MANIFEST)
    assert tags["lmref.version"] and tags["resumed_from"] == "0"


def test_run_model_artifact_is_the_saved_folder(tracked, tmp_path):
    result, _, client, out = tracked
    assert verify_manifest(out / "final") is None
    local = client.download_artifacts(result.run_id, "model", str(tmp_path))
    assert verify_manifest(local) is None  # every file there, as the manifest says
    assert (tmp_path / "model" / MANIFEST).read_bytes() == (out / "final" / MANIFEST).read_bytes()
    assert mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/model/config.json")


def test_a_failing_run_ends_failed(server, tiny_model_dir, data, tmp_path):
    from lmref.training.loop import SimulatedFailure, fail_at_step

    client = mlflow.MlflowClient(server)
    before = {r.info.run_id for r in client.search_runs([_experiment(client)])}
    with pytest.raises(SimulatedFailure):
        _train(tiny_model_dir, data, tmp_path, "mlflow", callbacks=[fail_at_step(LOG_EVERY)])
    (new,) = [r for r in client.search_runs([_experiment(client)]) if r.info.run_id not in before]
    assert new.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(new.info.run_id, "loss")] == [LOG_EVERY]


def test_report_to_none_touches_no_mlflow(server, tiny_model_dir, data, tmp_path):
    client = mlflow.MlflowClient(server)
    before = len(client.search_runs([_experiment(client)]))
    result = _train(tiny_model_dir, data, tmp_path, ["none"])
    assert result.run_id is None
    assert len(client.search_runs([_experiment(client)])) == before
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_tensorboard_events_read_back(tiny_model_dir, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _train(tiny_model_dir, data, tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "runs" / "tiny-tracked"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    logged = [(h["step"], h["loss"]) for h in result.history if "loss" in h]
    assert [s for s, _ in losses] == [s for s, _ in logged] == [2, 4]
    assert [v for _, v in losses] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert (
        "lineage" in events.Tags()["tensors"] or "lineage/text_summary" in events.Tags()["tensors"]
    )


def test_an_optuna_study_logs_each_trial(server, tmp_path):
    from lmref.tuning.space import Param, suggest
    from lmref.tuning.study import StudyConfig, report, run_study
    from lmref.tuning.tracking import MlflowTrialLogger

    space = [Param("x", -2.0, 2.0), Param("layers", choices=(1, 2))]

    def objective(trial):
        params = suggest(trial, space)
        if trial.number == 1:
            trial.report(9.0, 1)
            raise optuna.TrialPruned()
        report(trial, 1, params["x"] ** 2)
        return params["x"] ** 2 + params["layers"]

    logger = MlflowTrialLogger("toy-study")
    config = StudyConfig("toy-study", str(tmp_path / "s.journal"), sampler="random", n_trials=3)
    study = run_study(objective, config, space, on_trial=logger)
    client = mlflow.MlflowClient(server)
    runs = client.search_runs(
        [_experiment(client)], "tags.lmref.run_kind = 'trial' and tags.`optuna.study` = 'toy-study'"
    )
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in runs}
    assert sorted(by_trial) == [0, 1, 2] == sorted(logger.run_ids)
    for t in study.trials:
        run = by_trial[t.number]
        assert run.data.tags["mlflow.parentRunId"] == logger.parent_run_id
        assert run.data.params == {k: str(v) for k, v in t.params.items()}
        assert run.data.tags["optuna.state"] == t.state.name.lower()
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert run.data.metrics["value"] == pytest.approx(t.value)
    assert (
        by_trial[1].data.tags["optuna.state"] == "pruned"
        and "value" not in by_trial[1].data.metrics
    )


def _experiment(client) -> str:
    return client.get_experiment_by_name("test-tracking").experiment_id
