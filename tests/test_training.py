"""The training loop: exact resume (exception and real SIGKILL), crash-safe checkpoints,
token-weighted gradient accumulation, schedule, precision choice, compiled checkpoints; damaged
checkpoints skipped, changed settings refused or applied, bad settings caught before a step."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import pytest
import torch

from lmref.core.device import select_precision
from lmref.models.presets import build_model
from lmref.training import checkpoints
from lmref.training import loop as training
from lmref.training.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint
from lmref.training.config import TrainingConfig
from lmref.training.loop import SimulatedFailure, fail_at_step, train

VOCAB = 256


def make_data(n: int = 64, seq: int = 32, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict(
        {"input_ids": torch.randint(0, VOCAB, (n, seq), generator=g).tolist()}
    )


def small_model(dropout: float = 0.1):
    # Dropout on, so that resume must restore the RNG to match bitwise.
    return build_model(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=dropout,
    )


def config(tmp_path, **kw) -> TrainingConfig:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=2,
        logging_steps=2,
        save_steps=3,
        disable_tqdm=True,
    )
    return TrainingConfig(**{**base, **kw})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.unit
def test_resume_after_exception_is_bitwise_identical(tmp_path):
    data = make_data()
    reference = small_model()
    train(reference, data, config(tmp_path / "ref"))

    with pytest.raises(SimulatedFailure):
        train(small_model(), data, config(tmp_path / "run"), callbacks=[fail_at_step(5)])
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-0000003"

    resumed = small_model()
    resumed.model.embed_tokens.weight.data.zero_()  # the state must come from disk
    result = train(resumed, data, config(tmp_path / "run", resume_from_checkpoint=True))
    assert result.resumed_from_step == 3 and result.step == 8
    assert_bitwise_equal(weights(reference), weights(resumed))
    # The metrics log holds each step once: lines the crashed run wrote after step 3 are dropped.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in lines]
    assert steps == sorted(set(steps))


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_training import make_data, small_model, config
    from pathlib import Path
    from lmref.training.loop import train
    slow = lambda step, metrics: time.sleep(0.3)  # leaves time to be killed mid-run
    model = small_model()
    train(model, make_data(), config(Path({out!r}), max_steps=12, resume_from_checkpoint=True),
          callbacks=[slow])
    torch.save(model.state_dict(), {out!r} + "/final.pt")
""")


@pytest.mark.slow  # about 40 s: three child processes, one killed
def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.time() + 120
    while latest_checkpoint(out) is None or latest_checkpoint(out).name < "checkpoint-0000006":
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "final.pt").exists()

    assert subprocess.run([sys.executable, str(script)], env=env, timeout=300).returncode == 0
    # The reference runs the same script uninterrupted, in the same kind of process.
    reference = tmp_path / "reference.py"
    reference.write_text(SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path / "ref")))
    assert subprocess.run([sys.executable, str(reference)], env=env, timeout=300).returncode == 0
    assert_bitwise_equal(
        torch.load(tmp_path / "ref" / "final.pt", weights_only=True),
        torch.load(out / "final.pt", weights_only=True),
    )


@pytest.mark.unit
def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    data = make_data()
    model = small_model()
    real_save = checkpoints.save_file
    calls = {"n": 0}

    def failing_save(tensors, path):
        calls["n"] += 1
        real_save(tensors, path)
        if calls["n"] == 2:  # the second checkpoint dies after its weights hit the disk
            raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", failing_save)
    with pytest.raises(OSError):
        train(model, data, config(tmp_path))
    monkeypatch.setattr(checkpoints, "save_file", real_save)

    assert latest_checkpoint(tmp_path).name == "checkpoint-0000003"
    assert (tmp_path / ".tmp-checkpoint-0000006").exists()  # the torn write is left aside
    state = load_checkpoint(latest_checkpoint(tmp_path), small_model())
    assert state["step"] == 3
    result = train(small_model(), data, config(tmp_path, resume_from_checkpoint=True))
    assert result.resumed_from_step == 3 and result.step == 8


def masked_collate(rows):
    """Labels with a different number of masked positions per row, as in instruction data."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = ids.clone()
    for i, row in enumerate(ids):
        labels[i, : int(row[0]) % 20] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.mark.unit
def test_gradient_accumulation_matches_large_batch(tmp_path):
    data = make_data(n=64)
    big, accumulated = small_model(dropout=0.0), small_model(dropout=0.0)
    train(
        big,
        data,
        config(tmp_path / "a", max_steps=3, per_device_train_batch_size=16, save_steps=0),
        collate_fn=masked_collate,
    )
    train(
        accumulated,
        data,
        config(
            tmp_path / "b",
            max_steps=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            save_steps=0,
        ),
        collate_fn=masked_collate,
    )
    for (name, a), b in zip(big.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # And it is not trivially equal: the weights moved.
    assert not torch.equal(big.lm_head.weight, small_model(dropout=0.0).lm_head.weight)


@pytest.mark.unit
def test_schedule_warmup_then_cosine_to_min(tmp_path):
    result = train(
        small_model(),
        make_data(),
        config(
            tmp_path, max_steps=10, warmup_steps=4, logging_steps=1, save_steps=0, min_lr_ratio=0.1
        ),
    )
    lrs = [h["lr"] for h in result.history if "lr" in h]
    peak = 1e-2
    # After step s the scheduler holds the lr for step s+1: warmup is linear up to the peak ...
    assert lrs[:4] == pytest.approx([peak * s / 4 for s in (1, 2, 3, 4)])
    # ... then a cosine from the peak down to min_lr_ratio * peak at the last step.
    progress = [(s - 4) / 6 for s in range(5, 11)]
    expected = [peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))) for p in progress]
    assert lrs[4:] == pytest.approx(expected)


@pytest.mark.unit
def test_precision_per_device(monkeypatch):
    assert select_precision("cpu") == "fp32"
    assert select_precision("cpu", "bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert select_precision("cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert select_precision("cuda") == "fp16"
    with pytest.raises(ValueError, match="precision"):
        select_precision("cpu", "fp8")


@pytest.mark.unit
def test_fp16_scaler_and_bf16_autocast_run_on_cpu(tmp_path):
    # The mixed-precision code paths execute here too (CPU autocast supports both dtypes).
    for precision in ("bf16", "fp16"):
        result = train(
            small_model(),
            make_data(),
            config(tmp_path / precision, max_steps=3, precision=precision, save_steps=0),
        )
        assert math.isfinite(result.train_loss)


@pytest.mark.slow  # about 40 s on 2 cores: torch.compile's first compile
def test_compiled_model_checkpoint_loads_into_plain_model(tmp_path):
    model = small_model(dropout=0.0)
    train(model, make_data(n=16), config(tmp_path, max_steps=2, torch_compile=True, save_steps=2))
    from safetensors.torch import load_file

    keys = load_file(latest_checkpoint(tmp_path) / "model.safetensors").keys()
    assert not any("_orig_mod" in k for k in keys)
    plain = small_model(dropout=0.0)
    load_checkpoint(latest_checkpoint(tmp_path), plain)
    assert_bitwise_equal(weights(model), weights(plain))


@pytest.mark.unit
def test_only_trainable_parameters_change(tmp_path):
    model = small_model(dropout=0.0)
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    train(model, make_data(), config(tmp_path, max_steps=3, save_steps=3))
    assert torch.equal(before, frozen)
    from safetensors.torch import load_file

    saved = load_file(latest_checkpoint(tmp_path) / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight" not in saved and len(saved) > 0


@pytest.mark.unit
def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="make no batch"):
        train(small_model(), make_data(n=4), config(tmp_path, per_device_train_batch_size=8))
    with pytest.raises(FileNotFoundError):
        train(
            small_model(),
            make_data(),
            config(tmp_path, resume_from_checkpoint=str(tmp_path / "nope")),
        )


# ---------------------------------------------------------------- bad input and damaged checkpoints


def damage(checkpoint, how: str) -> None:
    if how == "truncated weights":
        f = checkpoint / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif how == "missing trainer state":
        (checkpoint / "trainer_state.json").unlink()
    elif how == "torn training state":
        f = checkpoint / "training_state.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated weights": "model.safetensors",
    "missing trainer state": "trainer_state.json",
    "torn training state": "training_state.pt",
}


@pytest.mark.unit
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, how):
    data = make_data()
    reference = small_model()
    train(reference, data, config(tmp_path / "ref"))
    with pytest.raises(SimulatedFailure):
        train(small_model(), data, config(tmp_path / "run"), callbacks=[fail_at_step(7)])
    damage(tmp_path / "run" / "checkpoint-0000006", how)

    resumed = small_model()
    with pytest.warns(UserWarning, match=f"checkpoint-0000006.*{DAMAGE[how]}"):
        result = train(resumed, data, config(tmp_path / "run", resume_from_checkpoint=True))
    assert result.resumed_from_step == 3 and result.step == 8
    assert_bitwise_equal(weights(reference), weights(resumed))


@pytest.mark.unit
def test_damaged_checkpoint_given_by_path_or_loaded_names_the_file(tmp_path):
    with pytest.raises(SimulatedFailure):
        train(small_model(), make_data(), config(tmp_path), callbacks=[fail_at_step(4)])
    checkpoint = tmp_path / "checkpoint-0000003"
    damage(checkpoint, "truncated weights")
    with pytest.raises(ValueError, match="checkpoint-0000003.*model.safetensors"):
        train(small_model(), make_data(), config(tmp_path, resume_from_checkpoint=str(checkpoint)))
    (checkpoint / "manifest.json").unlink()  # no manifest to compare: the reader names the file
    with pytest.raises(ValueError, match="cannot read .*checkpoint-0000003/model.safetensors"):
        load_checkpoint(checkpoint, small_model())


class Wrapper(torch.nn.Module):
    """A model whose own submodules are called ``module`` and ``original_module``."""

    def __init__(self):
        super().__init__()
        self.original_module = torch.nn.Linear(3, 3)
        self.module = torch.nn.Linear(3, 2)


@pytest.mark.unit
def test_wrapper_prefixes_are_stripped_only_at_the_front():
    strip = checkpoints._strip_wrappers
    # Before the fix, "module." was deleted anywhere: original_module.weight -> original_weight.
    assert strip("original_module.weight") == "original_module.weight"
    assert strip("model.layers.0.module.weight") == "model.layers.0.module.weight"
    assert strip("module.model.embed.weight") == "model.embed.weight"  # DDP
    assert strip("_orig_mod.module._orig_mod.lm_head.weight") == "lm_head.weight"  # nested


@pytest.mark.unit
def test_checkpoint_of_a_model_with_module_in_its_names_round_trips(tmp_path):
    torch.manual_seed(0)
    saved, loaded = Wrapper(), Wrapper()
    optimizer = torch.optim.AdamW(saved.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = checkpoints.save_checkpoint(
        tmp_path, saved, optimizer, scheduler, scaler, {"step": 1, "micro_step": 1}
    )
    load_checkpoint(path, loaded)  # before the fix: "does not match the model"
    assert_bitwise_equal(weights(saved), weights(loaded))
    # Saved from a compiled DDP model elsewhere: the wrappers' prefixes go, the names stay.
    ddp_names = {f"_orig_mod.module.{k}": v for k, v in saved.state_dict().items()}
    checkpoints.save_file(ddp_names, path / "model.safetensors")
    (path / "manifest.json").unlink()
    fresh = Wrapper()
    load_checkpoint(path, fresh)
    assert_bitwise_equal(weights(saved), weights(fresh))


@pytest.mark.unit
def test_resume_into_another_model_is_a_checkpoint_error_naming_the_mismatch(tmp_path):
    train(small_model(), make_data(), config(tmp_path, max_steps=3, save_steps=3))
    checkpoint = latest_checkpoint(tmp_path)
    wider = build_model(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=256,  # the checkpoint's MLPs are 128 wide
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    # Before the fix: torch's RuntimeError (shapes), or a plain ValueError (names).
    with pytest.raises(CheckpointError, match=r"other shape .*mlp\.\w+_proj\.weight \(128, 64\)"):
        load_checkpoint(checkpoint, wider)
    deeper = build_model(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(CheckpointError, match=r"trainable but not in the checkpoint .*layers\.2\."):
        train(deeper, make_data(), config(tmp_path, max_steps=3, resume_from_checkpoint=True))
    shallower = small_model()
    del shallower.model.layers[1]
    with pytest.raises(CheckpointError, match=r"not in the model .*layers\.1\."):
        load_checkpoint(checkpoint, shallower)


@pytest.mark.unit
def test_no_checkpoint_that_verifies_stops_the_resume_and_deletes_nothing(tmp_path):
    with pytest.raises(SimulatedFailure):
        train(small_model(), make_data(), config(tmp_path), callbacks=[fail_at_step(7)])
    for name in ("checkpoint-0000003", "checkpoint-0000006"):
        damage(tmp_path / name, "torn training state")
    with pytest.raises(
        ValueError,
        match="no checkpoint in .* verifies.*checkpoint-0000006.*"
        "training_state.pt.*checkpoint-0000003",
    ):
        train(small_model(), make_data(), config(tmp_path, resume_from_checkpoint=True))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-0000003",
        "checkpoint-0000006",
    ]


@pytest.mark.unit
def test_resume_with_other_settings_is_refused_with_the_list(tmp_path):
    with pytest.raises(SimulatedFailure):
        train(
            small_model(), make_data(), config(tmp_path, save_steps=2), callbacks=[fail_at_step(5)]
        )
    changed = config(
        tmp_path,
        save_steps=2,
        resume_from_checkpoint=True,
        learning_rate=5e-3,
        per_device_train_batch_size=16,
        logging_steps=1,
    )
    with pytest.raises(
        ValueError,
        match=r"learning_rate: 0\.01 -> 0\.005; "
        r"per_device_train_batch_size: 8 -> 16\. .*allow_config_change",
    ):
        train(small_model(), make_data(), changed)


@pytest.mark.unit
def test_allowed_settings_change_applies_the_new_lr_and_batch_size(tmp_path):
    data = make_data(n=64)
    with pytest.raises(SimulatedFailure):
        train(small_model(), data, config(tmp_path, save_steps=2), callbacks=[fail_at_step(5)])
    batches = []

    def recording_collate(rows):
        batches.append([tuple(r["input_ids"]) for r in rows])
        return training.collate_input_ids(rows)

    changed = config(
        tmp_path,
        save_steps=2,
        resume_from_checkpoint=True,
        learning_rate=5e-3,
        per_device_train_batch_size=16,
        logging_steps=1,
        allow_config_change=True,
    )
    with pytest.warns(UserWarning, match="learning_rate: 0.01 -> 0.005"):
        result = train(small_model(), data, changed, collate_fn=recording_collate)
    assert result.resumed_from_step == 4 and result.step == 8
    # The schedule is the new one (peak 5e-3, warmup 2, cosine to 0.1 x peak at step 8) from step 5.
    lrs = {h["step"]: h["lr"] for h in result.history if "lr" in h}
    expected = {
        s: 5e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))) for s in range(5, 9)
    }
    assert lrs == pytest.approx(expected)
    # Batches of 16 from where the old run stopped in the epoch: 4 steps x 8 = 32 samples done,
    # so the next batch is positions 32..47 of the epoch's permutation (none repeated or skipped).
    assert [len(b) for b in batches] == [16] * 4
    order = list(torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=0))
    rows = [tuple(r) for r in data["input_ids"]]
    assert batches[0] == [rows[i] for i in order[32:48]]


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_steps", 0),
        ("gradient_accumulation_steps", 0),
        ("per_device_train_batch_size", 0),
        ("per_device_eval_batch_size", 0),
        ("logging_steps", 0),
        ("warmup_steps", -1),
        ("learning_rate", 0.0),
    ],
)
@pytest.mark.unit
def test_settings_are_checked_before_anything_runs(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"TrainingConfig.{field} must be"):
        config(tmp_path, **{field: value})
    changed_later = config(tmp_path / "out")
    setattr(changed_later, field, value)  # set after construction: train() checks again
    with pytest.raises(ValueError, match=f"TrainingConfig.{field} must be"):
        train(small_model(), make_data(), changed_later)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


@pytest.mark.unit
def test_eval_set_without_label_tokens_fails_before_training(tmp_path):
    def no_labels(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": torch.full_like(ids, -100)}

    steps = []
    with pytest.raises(ValueError, match="eval_dataset has no label tokens"):
        train(
            small_model(),
            make_data(),
            config(tmp_path),
            eval_dataset=make_data(n=8),
            collate_fn=no_labels,
            callbacks=[lambda step, metrics: steps.append(step)],
        )
    assert steps == []  # before the fix: 8 steps trained, then the final evaluation raised


def cli_run(tmp_path, model_dir, *extra: str) -> list[str]:
    data = tmp_path / "blocks"
    if not data.exists():
        make_data(n=32, seq=16).save_to_disk(str(data))
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--save-steps",
        "2",
        "--eval-split",
        "none",
        "--disable-tqdm",
        *extra,
    ]


@pytest.mark.unit
def test_cli_resume_of_a_finished_run_keeps_its_result(tmp_path, tiny_model_dir):
    from lmref.train import main

    assert main(cli_run(tmp_path, tiny_model_dir)) == 0
    result_file = tmp_path / "run" / "final" / "train_result.json"
    first = result_file.read_text()
    assert main(cli_run(tmp_path, tiny_model_dir, "--resume")) == 0
    assert result_file.read_text() == first  # not rewritten (before: train_loss NaN)
    # And train() itself reports the last logged loss, not NaN, when nothing was left to train.
    result = train(small_model(), make_data(), config(tmp_path / "t", max_steps=3, save_steps=3))
    again = train(
        small_model(),
        make_data(),
        config(tmp_path / "t", max_steps=3, save_steps=3, resume_from_checkpoint=True),
    )
    assert again.step == again.resumed_from_step == 3 and again.train_loss == result.train_loss


@pytest.mark.unit
def test_cli_resume_of_a_finished_run_rebuilds_a_torn_final_model(tmp_path, tiny_model_dir, capsys):
    """Found by a user: a finished run whose final/model.safetensors was torn (truncated to 10
    bytes) resumed with exit 0 and kept the torn file. The final folder now carries a manifest,
    and a resume rebuilds it from the last checkpoint: the same weights, the same numbers."""
    from safetensors.torch import load_file

    from lmref.train import main
    from lmref.training.checkpoints import verify_checkpoint

    assert main(cli_run(tmp_path, tiny_model_dir)) == 0
    final = tmp_path / "run" / "final"
    assert verify_checkpoint(final) is None
    # Copies: load_file maps the file, and the truncation below would pull the pages away.
    weights = {k: v.clone() for k, v in load_file(final / "model.safetensors").items()}
    numbers = (final / "train_result.json").read_text()
    with open(final / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert "model.safetensors has 10 bytes" in str(verify_checkpoint(final))
    capsys.readouterr()
    assert main(cli_run(tmp_path, tiny_model_dir, "--resume")) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert verify_checkpoint(final) is None
    rebuilt = load_file(final / "model.safetensors")
    assert rebuilt.keys() == weights.keys()
    assert all(torch.equal(rebuilt[k], weights[k]) for k in weights)
    assert (final / "train_result.json").read_text() == numbers


@pytest.mark.unit
def test_cli_refuses_changed_settings_unless_allowed(tmp_path, tiny_model_dir, capsys):
    from lmref.train import main

    assert main(cli_run(tmp_path, tiny_model_dir, "--max-steps", "2")) == 0
    with pytest.raises(
        SystemExit,
        match=r"learning_rate: 0\.01 -> 0\.005; .*max_steps: 2 -> 4; "
        r"per_device_train_batch_size: 8 -> 16",
    ):
        main(cli_run(tmp_path, tiny_model_dir, "--resume", "--batch-size", "16", "--lr", "5e-3"))
    with pytest.warns(UserWarning, match="resuming with changed settings"):
        assert (
            main(
                cli_run(
                    tmp_path,
                    tiny_model_dir,
                    "--resume",
                    "--batch-size",
                    "16",
                    "--lr",
                    "5e-3",
                    "--allow-config-change",
                )
            )
            == 0
        )
    with pytest.raises(SystemExit, match="TrainingConfig.max_steps must be an integer >= 1, got 0"):
        main(cli_run(tmp_path, tiny_model_dir, "--max-steps", "0"))


@pytest.mark.unit
def test_cli_names_an_empty_split(tmp_path, tiny_model_dir):
    from lmref.train import main

    data = tmp_path / "blocks"
    datasets.DatasetDict(
        {"train": make_data(n=32, seq=16), "validation": make_data(n=32, seq=16).select([])}
    ).save_to_disk(str(data))
    with pytest.raises(SystemExit, match="the 'validation' split of .*blocks has no rows"):
        main(
            [
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--output-dir",
                str(tmp_path / "run"),
                "--max-steps",
                "2",
                "--batch-size",
                "8",
                "--disable-tqdm",
            ]
        )
