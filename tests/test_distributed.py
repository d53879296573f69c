"""Data parallelism with real torchrun (2 processes, gloo, CPU) and the pieces around it.

The torchrun tests launch real process groups: DDP with per-rank batch b equals one process
with batch 2b; every sample is seen once an epoch across ranks; only rank 0 writes files; a
rank killed mid-run is restarted by ``--max-restarts`` and the run ends with the same weights;
20 launches in a row exit cleanly. Each launch is kept tiny (2-layer hidden-64 model, 16-token
blocks, a few steps, one thread per process) because each costs ~3 interpreter start-ups.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from torchrun_helpers import launch, metric_steps, weights, write_blocks

from lmref.core import ranks
from lmref.core.processes import RunLog, run_logged
from lmref.train import main as train_main
from lmref.train import parse_config
from lmref.training import distributed as D
from lmref.training import launch as L

pytestmark = pytest.mark.integration  # torchrun jobs of two processes
VOCAB = 512  # the tiny_model_dir fixture's vocabulary
STEPS = 6
ACCUMULATION = 2
SEQ = 16
SAMPLES = 24
TORCHRUN_ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Blocks whose first token is the block's index, so a batch tells which samples it holds."""
    return write_blocks(tmp_path_factory.mktemp("ddp-data") / "blocks", SAMPLES, SEQ, VOCAB)


def cli_args(
    model_dir: Path, data_dir: Path, out: Path, batch: int = 2, accumulation: int = ACCUMULATION
) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        str(batch),
        "--lr",
        "1e-2",
        "--grad-accum",
        str(accumulation),
        "--warmup-steps",
        "1",
        "--logging-steps",
        "1",
        "--save-steps",
        "2",
        "--eval-split",
        "none",
        "--disable-tqdm",
    ]


PROBE = textwrap.dedent("""
    # Runs `python -m lmref.train` (its main()) under torchrun and records, per rank: the samples
    # each batch holds, the gradient all-reduces (a DDP comm hook doing what the built-in one
    # does), and every file-system write under output_dir (an audit hook).
    import json, os, sys
    from pathlib import Path

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    import lmref.train as cli
    from lmref.training import loop as training

    record_path, argv = sys.argv[1], sys.argv[2:]
    watched = str(Path(argv[argv.index("--output-dir") + 1]).resolve())
    writes, seen, allreduces = [], [], []
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            if os.path.abspath(os.fsdecode(path)).startswith(watched):
                writes.append([event, os.fsdecode(path)])

    collate = training.collate_input_ids
    def recording_collate(rows):
        seen.append([row["input_ids"][0] for row in rows])  # first token = sample index
        return collate(rows)
    training.collate_input_ids = recording_collate  # train() looks it up at call time

    wrap = cli.wrap_model
    def counting_allreduce(state, bucket):
        allreduces.append(bucket.index())
        return allreduce_hook(state, bucket)  # pre-divides by world size, as DDP's own does
    def wrap_and_count(model, env):
        wrapped = wrap(model, env)
        wrapped.register_comm_hook(None, counting_allreduce)
        return wrapped
    cli.wrap_model = wrap_and_count

    sys.addaudithook(audit)
    cli.main(argv)
    rank = int(os.environ["RANK"])
    Path(f"{record_path}.rank{rank}.json").write_text(json.dumps(
        {"seen": seen, "writes": writes, "allreduces": allreduces}))
""")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, data_dir) -> tuple[Path, list[dict]]:
    """The reference: torchrun, 2 processes, per-rank batch 2 x accumulation 2 (global batch 8),
    run through the probe, which returns each rank's record."""
    root = tmp_path_factory.mktemp("ddp")
    probe, out = root / "probe.py", root / "run"
    probe.write_text(PROBE)
    log = launch([str(probe), str(root / "record"), *cli_args(tiny_model_dir, data_dir, out)])
    log.check()
    assert "on 2 process(es)" in log.output
    return out, [json.loads((root / f"record.rank{r}.json").read_text()) for r in (0, 1)]


# ---------------------------------------------------------------- real torchrun


def test_two_processes_match_one_process_with_double_batch(
    ddp_run, tiny_model_dir, data_dir, tmp_path
):
    ddp_dir, _ = ddp_run
    # One process, batch 8, no accumulation, in this interpreter (no torchrun: world size 1).
    single_args = cli_args(tiny_model_dir, data_dir, tmp_path / "single", batch=8, accumulation=1)
    assert train_main(single_args) == 0
    single, ddp = weights(tmp_path / "single"), weights(ddp_dir)
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    moved, diff = L.max_abs_difference(single, initial), L.max_abs_difference(single, ddp)
    # Same samples per step, loss weighted by tokens: equal up to float summation order
    # (measured ~2e-6 here), while training moved the weights by ~1e-2.
    assert diff < 2e-5, diff
    assert moved > 1e-3, moved
    result = json.loads((ddp_dir / "final" / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == STEPS
    assert metric_steps(ddp_dir) == list(range(1, STEPS + 1))  # one line a step, not one a rank


def test_every_sample_once_per_epoch_across_ranks(ddp_run):
    _, ranks = ddp_run
    # 24 samples / 2 ranks / micro-batch 2 = 6 micro-batches a rank an epoch = 3 optimizer
    # steps (accumulation 2): the 6 steps are 2 epochs.
    epochs = [[sum(r["seen"][e * 6 : (e + 1) * 6], []) for e in (0, 1)] for r in ranks]
    assert all(len(r["seen"]) == STEPS * ACCUMULATION for r in ranks)
    for e in (0, 1):
        a, b = epochs[0][e], epochs[1][e]
        assert len(a) == len(b) == SAMPLES // 2 and not set(a) & set(b)
        assert sorted(a + b) == list(range(SAMPLES)), f"epoch {e}: not each sample exactly once"
    assert epochs[0][0] != epochs[0][1], "each epoch must reshuffle"


def test_only_rank_zero_writes_files(ddp_run):
    ddp_dir, ranks = ddp_run
    assert ranks[1]["writes"] == []
    written = {Path(p).name for _, p in ranks[0]["writes"]}  # the probe does see rank 0's writes
    assert {"metrics.jsonl", ".tmp-checkpoint-0000002", "final"} <= written, written
    assert sorted(p.name for p in ddp_dir.glob("checkpoint-*")) == [
        "checkpoint-0000004",
        "checkpoint-0000006",
    ]


def test_accumulation_micro_steps_skip_the_gradient_allreduce(ddp_run):
    _, ranks = ddp_run
    for r in ranks:
        buckets = set(r["allreduces"])
        # Each bucket once an optimizer step (no_sync on the first micro-step), not once a micro-step.
        assert buckets and len(r["allreduces"]) == STEPS * len(buckets), r["allreduces"]


def launch_until_final_line(args: list[str], marker: str, **kwargs) -> tuple[RunLog, float]:
    """``launch``, and how many seconds the job took to exit after printing ``marker``."""
    seen_at: list[float] = []

    def watch(line: str) -> bool:
        if marker in line and not seen_at:
            seen_at.append(time.perf_counter())
        return False

    log = launch(args, echo=watch, **kwargs)
    return log, (time.perf_counter() - seen_at[0]) if seen_at else math.inf


# A finished worker exits in about 2-4 s here (interpreter teardown); a deadlock never does.
PROMPT_EXIT_S = 30.0


def test_killed_rank_restarts_and_ends_with_uninterrupted_weights(
    ddp_run, tiny_model_dir, data_dir, tmp_path
):
    """A rank dies after step 3; torchrun restarts the group, which resumes from step 2 and ends
    with the uninterrupted run's weights, and the job exits promptly after its final line (it
    once hung there: see test_leaving_a_group_many_times_never_deadlocks). More launches:
    LMREF_TEST_RESTART_LAUNCHES."""
    for i in range(int(os.environ.get("LMREF_TEST_RESTART_LAUNCHES", 1))):
        out = tmp_path / f"faulty{i}"
        log, exit_after_final_s = launch_until_final_line(
            ["-m", "lmref.train", *cli_args(tiny_model_dir, data_dir, out), "--resume"],
            '"final_dir"',
            max_restarts=1,
            extra_env={D.FAIL_AT_STEP: "3", D.FAIL_RANK: "1"},
        )
        log.check()
        assert exit_after_final_s < PROMPT_EXIT_S, (
            f"launch {i}: exited {exit_after_final_s:.0f} s after its final line"
        )
        assert log.output.count("fault injection: exiting") == 1
        assert "attempt 1" in log.output  # the restarted group's banner
        result = json.loads((out / "final" / "train_result.json").read_text())
        assert result["restart_count"] == 1 and result["resumed_from_step"] == 2
        assert metric_steps(out) == list(range(1, STEPS + 1))  # step 3's line dropped on resume
        resumed, reference = weights(out), weights(ddp_run[0])
        for name in reference:
            assert torch.equal(resumed[name], reference[name]), f"{name} differs"


CYCLES = textwrap.dedent("""
    # Join the group, train one DDP step, gather an object (as a checkpoint's RNG states are),
    # leave, drop the model: the moment at which a finished job used to deadlock.
    import sys, torch, torch.distributed as dist
    from lmref.training.distributed import distributed, wrap_model

    for cycle in range(int(sys.argv[1])):
        with distributed(timeout_s=60) as env:
            model = wrap_model(torch.nn.Linear(8, 8), env)
            model(torch.randn(4, 8)).sum().backward()
            dist.all_gather_object([None] * env.world_size, torch.get_rng_state())
        del model
    print(f"rank {env.rank}: {cycle + 1} cycles", flush=True)
""")


def test_leaving_a_group_many_times_never_deadlocks(tmp_path):
    """The hang of a finished job (issue 20), reproduced in one launch: DDP's C++ Reducer held the
    last reference to the destroyed group, so freeing the model joined gloo's threads with the GIL
    held while a gloo thread waited for the GIL (py-spy showed both). Before the fix one rank
    deadlocked within about 45 cycles (3 runs of 3); lmref.training.distributed.cleanup now frees the
    Reducers first.
    LMREF_TEST_CYCLES for more."""
    script = tmp_path / "cycles.py"
    script.write_text(CYCLES)
    cycles = int(os.environ.get("LMREF_TEST_CYCLES", 100))
    log = launch([str(script), str(cycles)], timeout_s=240)
    log.check()  # on a hang: the stacks of every rank (lmref.core.processes)
    assert log.output.count(f": {cycles} cycles") == 2, log.output[-2000:]


TEARDOWN = textwrap.dedent("""
    import torch, torch.distributed as dist
    from lmref.training.distributed import distributed

    with distributed() as env:
        total = torch.tensor([env.rank + 1.0])
        dist.all_reduce(total)
        assert total.item() == env.world_size * (env.world_size + 1) / 2, total
    print(f"rank {env.rank} clean", flush=True)
""")


def test_repeated_launches_end_cleanly(tmp_path):
    """Without a barrier before destroy_process_group, about 3 launches in 10 died at teardown.
    4 launches here catch that with probability 1 - 0.7**4 = 0.76 alone; every other torchrun
    launch of the suite leaves through the same ``cleanup()`` and must exit 0 too (about 15 more
    in tests/test_distributed.py, test_parallel.py, test_parallel_costs.py and test_elastic.py),
    so a run of ``make test`` catches it with probability above 0.998 (1 - 0.7**19). This test keeps the
    signature check (no SIGABRT, both ranks print "clean"); LMREF_TEST_LAUNCHES for more."""
    script = tmp_path / "allreduce.py"
    script.write_text(TEARDOWN)
    launches = int(os.environ.get("LMREF_TEST_LAUNCHES", 4))
    for i in range(launches):
        log = launch([str(script)], timeout_s=120)
        assert log.ok, f"launch {i}: {log.returncode}\n{log.output[-3000:]}"
        assert "SIGABRT" not in log.output and "Signal 6" not in log.output, log.output
        assert log.output.count(" clean") == 2, log.output


# ---------------------------------------------------------------- in-process pieces


def test_no_torchrun_environment_is_a_noop_with_world_size_one(monkeypatch, capsys):
    for key in TORCHRUN_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    with D.distributed() as env:
        assert (env.rank, env.world_size, env.launched) == (0, 1, False)
        assert not torch.distributed.is_initialized()
        model = D.wrap_model(torch.nn.Linear(2, 2), env)
        assert isinstance(model, torch.nn.Linear) and D.unwrap_model(model) is model
        assert ranks.is_main()
        D.print0("hello from rank 0")
    assert capsys.readouterr().out == "hello from rank 0\n"


def test_read_env_parses_torchrun_variables_and_rejects_bad_ones():
    full = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RESTART_COUNT": "2",
    }
    env = D.read_env(full)
    assert (env.rank, env.local_rank, env.world_size, env.master_port, env.restart_count) == (
        3,
        1,
        4,
        29500,
        2,
    )
    assert env.launched and not env.is_main
    assert D.read_env({}) == D.DistEnv()
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.read_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        D.read_env({**full, "RANK": "4"})
    with pytest.raises(ValueError, match="integer"):
        D.read_env({**full, "WORLD_SIZE": "two"})


def test_fault_injection_targets_one_rank_on_the_first_attempt_only():
    def env(rank, attempt):
        return D.DistEnv(rank=rank, world_size=2, restart_count=attempt, launched=True)

    ask = {D.FAIL_AT_STEP: "3", D.FAIL_RANK: "1"}
    assert D.fault_injection_from_env({}, env(1, 0)) is None
    assert D.fault_injection_from_env(ask, env(0, 0)) is None
    assert D.fault_injection_from_env(ask, env(1, 1)) is None
    callback = D.fault_injection_from_env(ask, env(1, 0))
    assert callable(callback)
    callback(2, {})  # not yet: returns (at step 3 it would os._exit the process)
    with pytest.raises(ValueError, match="integers"):
        D.fault_injection_from_env({D.FAIL_AT_STEP: "three"}, env(0, 0))


def test_torchrun_command_single_and_multi_node():
    single = L.torchrun_command(["-m", "lmref.train"], 2, launcher=["torchrun"])
    assert single == [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=0",
        "-m",
        "lmref.train",
    ]
    multi = L.format_command(
        L.torchrun_command(
            ["-m", "lmref.train"],
            8,
            nnodes=2,
            rdzv_endpoint="node0:29500",
            max_restarts=3,
            launcher=["torchrun"],
        )
    )
    assert (
        "torchrun --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 "
        "--rdzv-id=lmref --nproc-per-node=8 --max-restarts=3 -m lmref.train"
    ) == multi
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        L.torchrun_command(["x.py"], nnodes=2)


def test_ring_allreduce_volume():
    assert L.ring_allreduce_bytes(1000, 1) == 0
    assert L.ring_allreduce_bytes(1000, 2, 4) == 4000  # 2 (N-1)/N = 1 at N = 2
    assert L.ring_allreduce_bytes(1000, 8, 2) == 2 * 7 / 8 * 2000
    estimate = L.ddp_step_estimate(124_000_000, 8192, 8, bus_bandwidth_gbs=100, peak_flops=1e15)
    assert estimate["allreduce_bytes"] == L.ring_allreduce_bytes(124_000_000, 8, 4)
    assert estimate["step_s_overlapped"] <= estimate["step_s_serial"]
    with pytest.raises(ValueError):
        L.ring_allreduce_bytes(10, 0)


def test_run_logged_streams_and_kills_on_timeout():
    # The job starts a child in a session of its own, as torchrun starts its workers: killpg
    # cannot reach it, and the timeout must still end it and report its stack.
    code = (
        "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(60)'], start_new_session=True); "
        "print('started', child.pid, flush=True); time.sleep(60)"
    )
    log = run_logged([sys.executable, "-c", code], timeout_s=5, echo=False)
    assert log.timed_out and not log.ok and log.lines[0].startswith("started")
    child = int(log.lines[0].split()[1])
    child_report = log.stacks[log.stacks.index(f"--- pid {child} ") :]
    assert "time_sleep" in child_report  # py-spy's native frame: the child's stack was dumped
    assert log.seconds < 40
    time.sleep(0.5)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(RuntimeError, match="timed out"):
        log.check()


def test_cli_config_file_then_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: tiny-gpt2\nmax_steps: 7\nlearning_rate: 0.002\n"
        "model_overrides: {num_hidden_layers: 2}\n"
    )
    config = parse_config(
        [
            "--config",
            str(config_file),
            "--lr",
            "0.01",
            "--resume",
            "--grad-accum",
            "4",
            "--max-grad-norm",
            "none",
        ]
    )
    assert config.model == "tiny-gpt2" and config.model_overrides == {"num_hidden_layers": 2}
    assert config.training.max_steps == 7 and config.training.learning_rate == 0.01
    assert config.training.resume_from_checkpoint is True
    assert (
        config.training.gradient_accumulation_steps == 4 and config.training.max_grad_norm is None
    )
    assert parse_config(["--resume", "ckpt/x"]).training.resume_from_checkpoint == "ckpt/x"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"max_stepz": 3}))
    with pytest.raises(SystemExit, match="unknown config keys"):
        parse_config(["--config", str(bad)])


def test_cli_rejects_missing_data_and_a_too_small_vocabulary(tmp_path, data_dir):
    with pytest.raises(SystemExit, match="no dataset"):
        train_main(["--data", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="vocabulary"):
        train_main(
            [
                "--model",
                "tiny",
                "--model-overrides",
                '{"vocab_size": 64}',
                "--data",
                str(data_dir),
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
