"""Lineage and the report_to policy without a server: data fingerprints, code versions, the
tags ``lineage`` returns, ``report_to``'s values and errors, the embedded tracking URI, and a
``report_to="none"`` run that never imports mlflow."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmref.core.hashing import sha256_of
from lmref.core.lineage import code_version, data_fingerprint, lineage
from lmref.core.manifest import write_manifest
from lmref.core.tracking import resolve_report_to, resolve_tracking_uri
from lmref.training.config import TrainingConfig

pytestmark = pytest.mark.unit


def test_data_fingerprint_is_the_rows_not_their_storage():
    import pyarrow as pa
    from datasets import Dataset

    rows = [[1, 2, 3], [4, 5], [6]]
    wide = Dataset.from_dict({"input_ids": rows, "other": ["a", "b", "c"]})
    narrow = Dataset(pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int32()))}))
    assert data_fingerprint(wide) == data_fingerprint(narrow)  # int32 vs int64, extra column
    assert data_fingerprint(wide.select([0, 1])) == data_fingerprint(
        Dataset.from_dict({"input_ids": rows[:2]})
    )
    assert data_fingerprint(
        Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5], [6]]})
    ) != data_fingerprint(wide)
    assert data_fingerprint([{"input_ids": r} for r in rows]) == data_fingerprint(
        [{"input_ids": r} for r in rows]
    )


def test_folder_fingerprint_is_its_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    unmanifested = data_fingerprint(tmp_path)
    write_manifest(tmp_path)
    assert data_fingerprint(tmp_path) == sha256_of(tmp_path / "manifest.json")
    assert len(unmanifested) == 64  # without a manifest: the sha256 of one computed now
    with pytest.raises(FileNotFoundError, match="no data folder"):
        data_fingerprint(tmp_path / "missing")


def test_code_version_names_commit_and_dirty(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert code_version(repo) == {"commit": head.strip(), "dirty": "false", "version": "0.1.0"}
    (repo / "f.py").write_text("x = 2\n")
    assert code_version(repo)["dirty"] == "true"
    assert code_version(tmp_path)["commit"] == "unknown"  # /tmp/...: no working tree


def test_lineage_tags(tmp_path):
    write_manifest(tmp_path)
    tags = lineage(data=[[1, 2]], recipe={"lr": 1e-3}, parent_model=tmp_path)
    assert tags["lmref.parent_model"] == str(tmp_path.resolve())
    assert tags["lmref.parent_manifest_sha256"] == sha256_of(tmp_path / "manifest.json")
    assert tags["lmref.data_fingerprint"] == data_fingerprint([[1, 2]])
    assert len(tags["lmref.recipe_sha256"]) == 64
    scratch = lineage(parent_model="")
    assert scratch["lmref.parent_model"] == "none (from scratch)"
    assert "lmref.data_fingerprint" not in scratch
    assert lineage(parent_model="HuggingFaceTB/SmolLM2-135M")["lmref.parent_model"].startswith(
        "Hugg"
    )


def test_report_to_values_and_errors():
    assert resolve_report_to("none") == resolve_report_to(None) == []
    assert resolve_report_to("all") == ["mlflow", "tensorboard"]
    assert resolve_report_to(["tensorboard", "mlflow"]) == ["mlflow", "tensorboard"]
    with pytest.raises(ValueError, match="wandb"):
        resolve_report_to(["wandb"])
    with pytest.raises(ValueError, match="report_to"):
        TrainingConfig(report_to=["none", "mlflow"])
    assert TrainingConfig(report_to="mlflow").report_to == ["mlflow"]
    assert TrainingConfig().report_to == ["none"]


def test_tracking_uri_default_is_a_store_in_the_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri(tmp_path, "http://127.0.0.1:2") == "http://127.0.0.1:2"


def test_an_untracked_run_never_imports_mlflow(tmp_path):
    script = f"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from lmref.training.config import TrainingConfig
from lmref.training.loop import train
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
data = [{{"input_ids": torch.arange(8)}} for _ in range(4)]
result = train(model, data, TrainingConfig(output_dir={str(tmp_path)!r}, max_steps=2,
    per_device_train_batch_size=2, disable_tqdm=True))
assert result.run_id is None
assert "mlflow" not in sys.modules and "torch.utils.tensorboard" not in sys.modules
print("ok")
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
