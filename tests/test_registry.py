"""The model registry (lmref.models.registry) and the release gate (lmref.evaluation.gate)
against one real MLflow server: register, alias, resolve and verify, serve by alias, gate.

The tiny random model cannot do the instruction tasks (0% on all of them, so nothing can be
shown either way); the gate tests score on items whose answers are the champion's own greedy
continuations (as if it had learned them) mixed with items it gets wrong, and a candidate with
noised weights is clearly worse on them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NAME = "lmref-chat"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One MLflow server for the module; MLFLOW_TRACKING_URI and the cache set for the tests."""
    from lmref.lab.lifecycle_servers import start_mlflow
    from lmref.lab.services import Services

    cache = tmp_path_factory.mktemp("registry-cache")
    with Services() as services, pytest.MonkeyPatch.context() as mp:
        server = services.add(start_mlflow())
        mp.setenv("MLFLOW_TRACKING_URI", server.url)
        mp.setenv("LMREF_REGISTRY_CACHE", str(cache))
        yield server


@pytest.fixture(scope="module")
def champion(registry, tiny_model_dir):
    from lmref.models.registry import register_folder, set_alias

    version = register_folder(NAME, tiny_model_dir, tags={"purpose": "test"})
    set_alias(NAME, "champion", version)
    return version


def test_register_alias_and_resolve(champion, tiny_model_dir):
    from lmref.core.manifest import manifest_files
    from lmref.models.loading import resolve_model
    from lmref.models.registry import (
        MANIFEST_TAG,
        fetch_model,
        registry_origin,
        resolve_version,
        version_tags,
    )

    assert resolve_version(f"models:/{NAME}@champion") == (NAME, champion)
    by_alias = Path(resolve_model(f"models:/{NAME}@champion"))
    by_version = fetch_model(f"models:/{NAME}/{champion}")
    assert by_alias == by_version and by_alias.name == champion  # cached by version
    assert manifest_files(by_alias) == manifest_files(tiny_model_dir)
    assert registry_origin(by_alias)["version"] == champion
    tags = version_tags(NAME, champion)
    assert tags["purpose"] == "test" and len(tags[MANIFEST_TAG]) == 64


def test_bad_uris_are_named(champion):
    from lmref.models.registry import RegistryError, fetch_model

    for uri, said in [
        (f"models:/{NAME}@nobody", "no alias 'nobody'"),
        (f"models:/{NAME}/999", "no such version"),
        ("models:/a/b/c", "is not models:/NAME/VERSION"),
    ]:
        with pytest.raises(RegistryError, match=said):
            fetch_model(uri)


def test_tampered_download_is_refused(registry, champion, tmp_path):
    """A file changed in the artifact store, then the file and its manifest rewritten together:
    both refused, naming the file; the cached folder is refused the same way."""
    from lmref.core.manifest import write_manifest
    from lmref.models.registry import RegistryConfig, RegistryError, fetch_model

    stored = Path(registry.workdir, "artifacts")
    config_json = next(p for p in stored.rglob("config.json") if p.parent.name == "model")
    original = config_json.read_bytes()
    try:
        config_json.write_bytes(original.replace(b"64", b"65", 1))  # same size, other bytes
        fresh = RegistryConfig(cache_dir=str(tmp_path / "a"))
        with pytest.raises(RegistryError, match="config.json does not match its sha256"):
            fetch_model(f"models:/{NAME}/{champion}", fresh)
        write_manifest(config_json.parent)  # a consistent forgery: its manifest rewritten too
        fresh = RegistryConfig(cache_dir=str(tmp_path / "b"))
        with pytest.raises(RegistryError, match="manifest.json is not the manifest registered"):
            fetch_model(f"models:/{NAME}/{champion}", fresh)
    finally:
        config_json.write_bytes(original)
        write_manifest(config_json.parent)
    cached = fetch_model(f"models:/{NAME}/{champion}")
    (cached / "extra.txt").write_text("added")
    try:
        with pytest.raises(RegistryError, match="extra.txt is not in the manifest"):
            fetch_model(f"models:/{NAME}@champion")
    finally:
        (cached / "extra.txt").unlink()


def test_replica_serves_the_champion_by_alias(registry, champion):
    import os

    import requests

    from lmref.lab.servers import start_replica
    from lmref.lab.services import Services

    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "LMREF_REGISTRY_CACHE")}
    with Services() as services:
        replica = services.add(
            start_replica(f"chat=models:/{NAME}@champion", ["--torch-threads", "1"], env=env)
        )
        card = requests.get(f"{replica.url}/v1/models/chat", timeout=10).json()
        assert card["registry"]["registered_model"] == NAME
        assert card["registry"]["version"] == champion
        out = requests.post(
            f"{replica.url}/v1/completions",
            json={"model": "chat", "prompt": "def", "max_tokens": 3},
            timeout=30,
        )
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def gate_items(champion, tmp_path_factory):
    """60 items: the champion's own greedy answers to 40 prompts, 20 wrong answers."""
    from lmref.evaluation.metrics import generate_text
    from lmref.models.loading import load_model, load_tokenizer
    from lmref.models.registry import fetch_model

    folder = fetch_model(f"models:/{NAME}/{champion}")
    prompts = [f"### Instruction:\nWrite item {i} in words.\n### Answer:\n" for i in range(60)]
    said = generate_text(load_model(folder), load_tokenizer(folder), prompts, max_new_tokens=6)
    answers = [s if i < 40 else f"not {s}" for i, s in enumerate(said)]
    path = tmp_path_factory.mktemp("gate") / "items.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers))
    )
    return path


def _register_copy(folder, tmp_path, noise: float) -> str:
    """Register ``folder``'s weights (noised when ``noise``) as a new version."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmref.core.manifest import write_manifest
    from lmref.models.registry import register_folder

    copy = tmp_path / f"copy-{noise}"
    shutil.copytree(folder, copy)
    (copy / "manifest.json").unlink()
    if noise:
        weights = load_file(copy / "model.safetensors")
        generator = torch.Generator().manual_seed(1)
        noised = {
            k: v + noise * torch.randn(v.shape, generator=generator) for k, v in weights.items()
        }
        save_file(noised, copy / "model.safetensors", metadata={"format": "pt"})
    write_manifest(copy)
    return register_folder(NAME, copy)


def test_gate_refuses_a_worse_candidate_and_promotes_an_equal_one(
    champion, gate_items, tiny_model_dir, tmp_path
):
    from lmref.evaluation.gate import GateConfig, main, release_gate, rollback
    from lmref.models.registry import alias_version, set_alias, version_tags

    worse = _register_copy(tiny_model_dir, tmp_path, noise=1.0)
    config = GateConfig(
        NAME, worse, margin=0.05, items=0, items_file=str(gate_items), max_new_tokens=6
    )
    decision = release_gate(config)
    assert not decision.promoted and decision.champion == champion
    assert decision.champion_score.correct == 40 and decision.candidate_score.correct < 10
    assert decision.difference.interval[0] < -0.5
    assert alias_version(NAME, "champion") == champion  # untouched
    tags = version_tags(NAME, worse)
    assert tags["gate.decision"] == "refused" and tags["gate.items"] == "60"
    assert (
        tags["gate.champion_score"].startswith("66.7% [") and len(tags["gate.items_sha256"]) == 64
    )

    same = _register_copy(tiny_model_dir, tmp_path, noise=0.0)
    set_alias(NAME, "challenger", same)
    argv = ["--name", NAME, "--candidate", "@challenger", "--items", "0"]
    assert main([*argv, "--items-file", str(gate_items), "--max-new-tokens", "6"]) == 0
    assert alias_version(NAME, "champion") == same
    assert alias_version(NAME, "previous") == champion
    tags = version_tags(NAME, same)
    assert tags["gate.decision"] == "promoted" and tags["gate.difference"] == "0.0000"
    assert rollback(NAME) == champion and alias_version(NAME, "champion") == champion
    assert main(["--name", NAME, "--candidate", "@nobody"]) == 2
    assert main(["--name", NAME, "--candidate", champion]) == 2  # already the champion


def test_register_a_runs_model_artifact(registry, tiny_model_dir, tmp_path):
    """As the tracking part logs a trained folder: runs:/<id>/model, registered by run id; a run
    whose folder has no manifest is refused, naming it."""
    from mlflow.tracking import MlflowClient

    from lmref.core.manifest import manifest_files
    from lmref.models.registry import RegistryError, fetch_model, register_run

    client = MlflowClient()
    run = client.create_run(client.create_experiment("training"))
    client.log_artifacts(run.info.run_id, str(tiny_model_dir), "model")
    version = register_run("lmref-from-run", run.info.run_id)
    folder = fetch_model(f"models:/lmref-from-run/{version}")
    assert manifest_files(folder) == manifest_files(tiny_model_dir)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(bare), "unverified")
    with pytest.raises(RegistryError, match="has no readable manifest.json"):
        register_run("lmref-from-run", run.info.run_id, artifact_path="unverified")
