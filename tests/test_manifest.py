"""Model integrity: every folder lmref saves carries a sha256 manifest, and the server refuses a
folder that does not match it (naming the file), or that has none unless told to serve it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from test_serve_cli import serve_command  # a sibling module, as torchrun_helpers

from lmref.core.manifest import MANIFEST, main, verify_manifest, write_manifest
from lmref.serve import config_from_args, refused_models
from lmref.serving.app import ModelSpec, ServingConfig, create_app
from lmref.serving.integrity import IntegrityError, check_model


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(folder, out)
    return out


def flip_one_byte(path: Path) -> None:
    """One byte late in the file (a tensor, not the header): the size stays the same."""
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.unit
def test_manifest_covers_subfolders_and_names_what_differs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"defg")
    write_manifest(tmp_path)
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert sorted(files) == ["a.bin", "sub/b.bin"] and files["a.bin"]["bytes"] == 3
    assert verify_manifest(tmp_path) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left

    (tmp_path / "sub" / "b.bin").write_bytes(b"dxfg")  # same size, another byte
    assert verify_manifest(tmp_path, hashes=False) is None  # the quick look reads no file
    assert "sub/b.bin does not match its sha256" in verify_manifest(tmp_path)
    (tmp_path / "sub" / "b.bin").write_bytes(b"de")
    assert "sub/b.bin has 2 bytes, the manifest says 4" in verify_manifest(tmp_path)
    write_manifest(tmp_path)
    (tmp_path / "extra.json").write_text("{}")
    (tmp_path / "a.bin").unlink()
    reason = verify_manifest(tmp_path)
    assert "a.bin is missing" in reason and "extra.json is not in the manifest" in reason
    (tmp_path / MANIFEST).unlink()
    assert "manifest.json is missing" in verify_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("[1]")
    assert "is unreadable" in verify_manifest(tmp_path)


@pytest.mark.unit
def test_the_command_writes_and_verifies(tiny_model_dir, tmp_path, capsys):
    folder = copy_of(tiny_model_dir, tmp_path)
    (folder / MANIFEST).unlink()
    assert main(["verify", str(folder)]) == 1
    assert main(["write", str(folder)]) == 0 and verify_manifest(folder) is None
    flip_one_byte(folder / "model.safetensors")
    assert main(["verify", str(folder)]) == 1
    assert "model.safetensors does not match" in capsys.readouterr().out


@pytest.mark.unit
def test_lmref_writers_leave_a_manifest_that_verifies(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmref.compression.quantization import save_model
    from lmref.training.lora import merge_and_save, save_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert verify_manifest(tiny_model_dir) is None  # the tests' own fixture, as lmref saves
    assert verify_manifest(save_model(model, tmp_path / "saved", tiny_tokenizer)) is None
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert verify_manifest(save_adapter(peft, tmp_path / "adapter", tiny_tokenizer)) is None
    merge_and_save(peft, tmp_path / "merged", tiny_tokenizer)
    assert verify_manifest(tmp_path / "merged") is None


@pytest.mark.unit
def test_check_model_refuses_unverifiable_sources(tiny_model_dir, tmp_path):
    assert check_model(str(tiny_model_dir)) == []
    folder = copy_of(tiny_model_dir, tmp_path)
    (folder / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match="has no manifest.json"):
        check_model(str(folder))
    assert "unverified" in check_model(str(folder), allow_unmanifested=True)[0]
    with pytest.raises(IntegrityError, match="not a local folder"):
        check_model("someone/some-model")  # a hub id: nothing to verify against
    assert check_model("someone/some-model", allow_unmanifested=True)
    # An adapter is checked with its local base: a tampered base refuses the adapter too.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(folder)})
    )
    write_manifest(adapter)
    write_manifest(folder)
    assert check_model(str(adapter)) == []
    flip_one_byte(folder / "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors does not match"):
        check_model(str(adapter))


@pytest.mark.unit
def test_a_tampered_folder_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    """The acceptance test of #25's model integrity: /ready says why, a request gets 503."""
    folder = copy_of(tiny_model_dir, tmp_path)
    flip_one_byte(folder / "model.safetensors")
    config = ServingConfig(
        models=[ModelSpec("ok", str(tiny_model_dir)), ModelSpec("bad", str(folder))],
        api_keys=[],
        load_in_background=False,
    )
    assert refused_models(config) == {}  # same sizes: only the engine's hashing catches it
    app = create_app(config)
    web = app.test_client()
    ready = web.get("/ready")
    assert ready.status_code == 503
    assert "model.safetensors does not match its sha256" in json.dumps(ready.json)
    r = web.post("/v1/completions", json={"model": "bad", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and r.json["error"]["code"] == "model_load_failed"
    ok = web.post("/v1/completions", json={"model": "ok", "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200  # one refused model does not take the others with it
    app.extensions["lmref"].close()


@pytest.mark.unit
def test_unmanifested_is_refused_unless_allowed_then_warned(tiny_model_dir, tmp_path, caplog):
    folder = copy_of(tiny_model_dir, tmp_path)
    (folder / MANIFEST).unlink()
    spec = ModelSpec("m", str(folder))
    refused = refused_models(ServingConfig(models=[spec], api_keys=[]))
    assert "has no manifest.json" in refused["m"] and "--allow-unmanifested" in refused["m"]
    config = ServingConfig(models=[spec], api_keys=[], load_in_background=False)
    assert create_app(config).test_client().get("/ready").status_code == 503
    allowed = ModelSpec("m", str(folder), allow_unmanifested=True)
    config = ServingConfig(models=[allowed], api_keys=[], load_in_background=False)
    with caplog.at_level(logging.WARNING, logger="lmref.serving.loader"):
        app = create_app(config)
        assert app.test_client().get("/ready").status_code == 200
        app.extensions["lmref"].close()
    assert any("unverified" in r.getMessage() for r in caplog.records)
    # The flag comes from ModelSpec's field, as every model flag of python -m lmref.serve does.
    argv = ["--model", f"m={folder}", "--allow-unmanifested"]
    assert config_from_args(argv).models[0].allow_unmanifested
    assert not config_from_args(argv[:2]).models[0].allow_unmanifested


@pytest.mark.integration
def test_the_command_exits_1_naming_the_tampered_file(tiny_model_dir, tmp_path):
    folder = copy_of(tiny_model_dir, tmp_path)
    flip_one_byte(folder / "model.safetensors")
    result = serve_command(["--model", f"bad={folder}", "--port", "0"], timeout=120)
    assert result.returncode == 1
    assert "model.safetensors does not match its sha256" in result.stderr


@pytest.mark.unit
def test_the_batch_worker_verifies_its_folders_unless_told_not_to(tiny_model_dir, tmp_path):
    from lmref.production.celery_app import BatchConfig
    from lmref.production.worker import BatchWorker

    folder = copy_of(tiny_model_dir, tmp_path)
    (folder / MANIFEST).unlink()
    models = {"LMREF_WORKER_MODELS": f"m={folder}"}
    with pytest.raises(RuntimeError, match="has no manifest.json"):
        BatchWorker(BatchConfig(), models).serving  # noqa: B018 (loads the models)
    worker = BatchWorker(BatchConfig(), {**models, "LMREF_ALLOW_UNMANIFESTED": "1"})
    assert worker.serving.engines["m"].ready
    worker.serving.close()
