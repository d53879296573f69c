"""An elastic torchrun job (``--nnodes 1:2``, two agents of one worker each on 127.0.0.1, c10d
rendezvous) training FSDP with sharded checkpoints: one node is killed, the survivor resumes
alone, a new node joins and the job finishes at world size 2 (``lmref.lab.elastic``).

What is asserted: the world sizes rank 0 logged (2, then 1, then 2), that every step from 1 to
the last appears once in the kept log (a resume drops the lines logged after its checkpoint,
and those steps are done again), that each stretch starts right after a checkpoint step, and
exit 0 of the agents that were not killed. Not asserted: weights equal to an uninterrupted run.
A world size that changes mid-run changes the global batch (the per-process batch is fixed), so
the steps at world size 1 train on other batches than 2 processes would: no other run does the
same arithmetic. ~50-70 s on 2 cores.
"""

from __future__ import annotations

import json

import pytest
from torchrun_helpers import write_blocks

from lmref.lab.elastic import run_elastic

STEPS, SAVE = 24, 2


@pytest.mark.integration
def test_elastic_job_shrinks_to_one_node_and_grows_back(tiny_model_dir, tmp_path):
    data = write_blocks(tmp_path / "blocks", samples=32, seq=16, vocab=512)
    run = run_elastic(
        [
            *("--model", str(tiny_model_dir), "--data", str(data), "--parallel", "fsdp"),
            *("--max-steps", str(STEPS), "--batch-size", "2", "--save-steps", str(SAVE)),
            *("--lr", "1e-2", "--warmup-steps", "1", "--eval-split", "none", "--disable-tqdm"),
        ],
        tmp_path / "run",
        kill_at_step=5,
        add_at_step=9,
        step_sleep_s=0.4,
        timeout_s=110,
    )
    phases = run.phases()
    assert [world for world, _ in phases] == [2, 1, 2], (phases, run.events)
    assert [s for _, steps in phases for s in steps] == list(range(1, STEPS + 1))
    for _, steps in phases[1:]:
        assert (steps[0] - 1) % SAVE == 0  # resumed from a checkpoint step
    assert run.exit_codes == {"a": 0, "b": None, "c": 0}, run.logs
    result = json.loads((tmp_path / "run" / "final" / "train_result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == STEPS
    assert result["resumed_from_step"] == phases[2][1][0] - 1


@pytest.mark.unit
def test_phases_group_steps_by_world_size_and_pacing_is_asked_for():
    from pathlib import Path

    from lmref.lab.elastic import ElasticRun
    from lmref.training.distributed import STEP_SLEEP_S, pacing_from_env

    records = [{"step": s, "world_size": w} for s, w in [(1, 2), (2, 2), (3, 1), (4, 2)]]
    run = ElasticRun(Path("."), records, logs={}, exit_codes={})
    assert run.phases() == [(2, [1, 2]), (1, [3]), (2, [4])]
    assert pacing_from_env({}) is None
    pacing_from_env({STEP_SLEEP_S: "0"})(1, {})  # a callback(step, metrics) that sleeps 0 s
