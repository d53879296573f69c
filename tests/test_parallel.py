"""FSDP2, tensor, pipeline and FSDP x TP parallelism through the one loop, with real torchrun
(gloo, CPU, one thread per process), and sharded checkpoints that change world size and mode.

Every mode trains the tiny 2-layer Llama for 4 steps on the same global batch of 8 blocks as one
process does, and must end with its weights. Tolerance 2e-5 (max abs difference of any weight):
the same samples, token-weighted loss and clipping make the runs the same arithmetic up to the
order of float32 sums (all-reduces, reduce-scatters, sharded matmuls, pipeline micro-batches);
measured here 2e-7 to 3e-6, while training moves the weights by ~1e-2.
A launch costs ~15 s (2 processes on 2 cores), the 4-process FSDP x TP one ~27 s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torchrun_helpers import launch, metric_steps, weights, write_blocks

from lmref.train import main as train_main
from lmref.train import parse_config
from lmref.training import distributed as D
from lmref.training import launch as L
from lmref.training.parallel import ParallelConfig, check_plan, make_plan
from lmref.training.pipeline_parallel import PipelinePlan

STEPS = 4
TOLERANCE = 2e-5  # see the module docstring


def args(model_dir: Path, data: Path, out: Path, batch: int, accumulation: int = 1) -> list[str]:
    return [
        *("--model", str(model_dir), "--data", str(data), "--output-dir", str(out)),
        *("--max-steps", str(STEPS), "--batch-size", str(batch), "--grad-accum", str(accumulation)),
        *("--lr", "1e-2", "--warmup-steps", "1", "--logging-steps", "1", "--save-steps", "2"),
        *("--eval-split", "none", "--disable-tqdm"),
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_blocks(tmp_path_factory.mktemp("parallel-data") / "blocks", 24, 16, 512)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, data) -> Path:
    """The reference: one process, batch 8 (in this interpreter: no torchrun)."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert train_main(args(tiny_model_dir, data, out, batch=8)) == 0
    return out


def close_to_single(run: Path, single: Path, tiny_model_dir: Path) -> float:
    reference, initial = weights(single), load_file(Path(tiny_model_dir) / "model.safetensors")
    assert L.max_abs_difference(reference, initial) > 1e-3  # training moved the weights
    diff = L.max_abs_difference(weights(run), reference)
    assert diff < TOLERANCE, diff
    return diff


def train_launch(parallel: list[str], out: Path, model, data, batch, accumulation, nproc=2):
    log = launch(
        ["-m", "lmref.train", *args(model, data, out, batch, accumulation), *parallel],
        nproc=nproc,
        timeout_s=150,
    )
    log.check()
    return log


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model_dir, data) -> Path:
    """FSDP over 2 ranks: micro-batch 2 x accumulation 2 x 2 data ranks = 8 a step."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    train_launch(["--parallel", "fsdp"], out, tiny_model_dir, data, 2, 2)
    return out


# ---------------------------------------------------------------- every mode = one process


@pytest.mark.integration
def test_fsdp_matches_one_process(fsdp_run, single, tiny_model_dir):
    close_to_single(fsdp_run, single, tiny_model_dir)
    result = json.loads((fsdp_run / "final" / "train_result.json").read_text())
    assert result["parallel"] == "fsdp" and result["world_size"] == 2
    assert metric_steps(fsdp_run) == list(range(1, STEPS + 1))
    shards = sorted(p.name for p in (fsdp_run / "checkpoint-0000004" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its shard
    manifest = json.loads((fsdp_run / "checkpoint-0000004" / "manifest.json").read_text())
    assert "sharded/__1_0.distcp" in manifest["files"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "parallel",
    [
        # TP ranks read the same batch: micro-batch 4 x accumulation 2 = 8 a step.
        ["--parallel", "tp"],
        ["--parallel", "tp", "--sequence-parallel"],
        ["--parallel", "pp", "--pp-schedule", "gpipe", "--pp-microbatches", "2"],
        ["--parallel", "pp", "--pp-schedule", "1f1b", "--pp-microbatches", "4"],
        ["--parallel", "fsdp", "--no-reshard-after-forward"],  # ZeRO-2 style
    ],
    ids=["tp", "tp-sequence-parallel", "pp-gpipe", "pp-1f1b", "fsdp-zero2"],
)
def test_mode_matches_one_process(parallel, single, tiny_model_dir, data, tmp_path):
    fsdp = parallel[1] == "fsdp"
    train_launch(parallel, tmp_path / "run", tiny_model_dir, data, 2 if fsdp else 4, 2)
    close_to_single(tmp_path / "run", single, tiny_model_dir)


@pytest.mark.integration
def test_fsdp_x_tp_on_a_2x2_mesh_matches_one_process(single, tiny_model_dir, data, tmp_path):
    """4 processes on 2 cores: ~27 s measured, so it runs (2 data groups x 2 TP ranks)."""
    log = train_launch(["--parallel", "fsdp+tp"], tmp_path / "run", tiny_model_dir, data, 2, 2, 4)
    assert "on 4 process(es) (fsdp+tp)" in log.output and "global batch 8" in log.output
    close_to_single(tmp_path / "run", single, tiny_model_dir)


# ---------------------------------------------------------------- resharding through DCP


def resume_dir(checkpoint: Path, out: Path) -> Path:
    """A fresh output folder holding one checkpoint, to resume from."""
    out.mkdir(parents=True)
    shutil.copytree(checkpoint, out / checkpoint.name)
    return out


@pytest.mark.integration
def test_sharded_checkpoint_resumes_on_one_process(
    fsdp_run, single, tiny_model_dir, data, tmp_path
):
    """2 -> 1: FSDP's step-2 checkpoint, resumed by one process with batch 8 (the data position
    converts: same samples)."""
    out = resume_dir(fsdp_run / "checkpoint-0000002", tmp_path / "run")
    resume = ["--resume", "--allow-config-change"]
    assert train_main([*args(tiny_model_dir, data, out, 8), *resume]) == 0
    assert json.loads((out / "final" / "train_result.json").read_text())["resumed_from_step"] == 2
    close_to_single(out, single, tiny_model_dir)


@pytest.mark.integration
def test_one_process_checkpoint_resumes_sharded(single, tiny_model_dir, data, tmp_path):
    """1 -> 2: the single run's (full safetensors) step-2 checkpoint resumed by FSDP."""
    out = resume_dir(single / "checkpoint-0000002", tmp_path / "run")
    resume = ["--parallel", "fsdp", "--resume", "--allow-config-change"]
    train_launch(resume, out, tiny_model_dir, data, 2, 2)
    assert json.loads((out / "final" / "train_result.json").read_text())["resumed_from_step"] == 2
    close_to_single(out, single, tiny_model_dir)


@pytest.mark.integration
def test_fsdp_checkpoint_resumes_as_tensor_parallel(
    fsdp_run, single, tiny_model_dir, data, tmp_path
):
    """2 -> 2 in another layout: FSDP's shards (dim 0 of every tensor) loaded into TP's
    (columns of q/k/v, rows of o_proj ...), with AdamW's moments."""
    out = resume_dir(fsdp_run / "checkpoint-0000002", tmp_path / "run")
    resume = ["--parallel", "tp", "--resume", "--allow-config-change"]
    log = train_launch(resume, out, tiny_model_dir, data, 4, 2)
    assert "(tp)" in log.output
    close_to_single(out, single, tiny_model_dir)


@pytest.mark.integration
def test_killed_fsdp_rank_restarts_from_the_sharded_checkpoint(
    fsdp_run, tiny_model_dir, data, tmp_path
):
    """Rank 1 dies after step 3; torchrun restarts both, which resume from the sharded step-2
    checkpoint and end with the uninterrupted FSDP run's weights (same layout and arithmetic:
    measured equal; asserted within 1e-6)."""
    out = tmp_path / "run"
    log = launch(
        ["-m", "lmref.train", *args(tiny_model_dir, data, out, 2, 2), "--parallel", "fsdp",
         "--resume"],
        max_restarts=1,
        extra_env={D.FAIL_AT_STEP: "3", D.FAIL_RANK: "1"},
        timeout_s=200,
    )  # fmt: skip
    log.check()
    assert log.output.count("fault injection: exiting") == 1 and "attempt 1" in log.output
    result = json.loads((out / "final" / "train_result.json").read_text())
    assert result["restart_count"] == 1 and result["resumed_from_step"] == 2
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert L.max_abs_difference(weights(out), weights(fsdp_run)) < 1e-6


# ---------------------------------------------------------------- plans and their checks


@pytest.mark.unit
def test_tensor_parallel_needs_heads_divisible_by_the_world_size():
    from transformers import LlamaConfig

    model = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    check_plan(ParallelConfig(parallel="tp"), 2, model)
    with pytest.raises(
        ValueError, match=r"num_attention_heads=4 is not divisible by the tensor-parallel size 3"
    ):
        check_plan(ParallelConfig(parallel="tp"), 3, model)
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 is not divisible .* size 4"):
        check_plan(ParallelConfig(parallel="tp"), 4, model)
    with pytest.raises(ValueError, match="world size 3, tensor-parallel size 2"):
        check_plan(ParallelConfig(parallel="fsdp+tp"), 3, model)
    with pytest.raises(ValueError, match="must be one of ddp, fsdp, tp, pp, fsdp\\+tp"):
        check_plan(ParallelConfig(parallel="zero"), 2)
    with pytest.raises(ValueError, match="2 layers cannot make 4 pipeline stages"):
        check_plan(ParallelConfig(parallel="pp"), 4, LlamaConfig(num_hidden_layers=2))
    with pytest.raises(ValueError, match="gpipe or 1f1b"):
        check_plan(ParallelConfig(parallel="pp", pp_schedule="zb"), 2)


@pytest.mark.unit
def test_plans_on_one_process_and_the_pipeline_checks(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    plan = make_plan(ParallelConfig(parallel="fsdp"))
    assert (plan.mode, plan.data_world, plan.sharded_state) == ("none", 1, False)
    assert make_plan(ParallelConfig(parallel="pp")).mode == "none"
    from lmref.core.losses import causal_lm_loss_sum
    from lmref.training.config import TrainingConfig

    pp = PipelinePlan(config=ParallelConfig(parallel="pp", pp_microbatches=3), world=2)
    config = TrainingConfig(per_device_train_batch_size=4)
    with pytest.raises(
        ValueError, match="micro-batch size 4 is not divisible by --pp-microbatches 3"
    ):
        pp.check_run(config, causal_lm_loss_sum, None)
    with pytest.raises(ValueError, match="does not evaluate"):
        pp.check_run(TrainingConfig(per_device_train_batch_size=3), causal_lm_loss_sum, [1])


@pytest.mark.unit
def test_cli_parallel_flags():
    config = parse_config(
        ["--parallel", "pp", "--pp-schedule", "1f1b", "--pp-microbatches", "4", "--cpu-offload"]
    )
    assert config.parallelism == ParallelConfig(
        parallel="pp", pp_schedule="1f1b", pp_microbatches=4, cpu_offload=True
    )
    assert parse_config([]).parallelism.parallel == "ddp"  # the default stays DDP
    assert not parse_config(["--no-reshard-after-forward"]).parallelism.reshard_after_forward
