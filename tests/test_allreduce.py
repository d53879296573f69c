"""The ring all-reduce by hand (lmref.training.allreduce): its schedule, simulated in one process,
sums every rank's tensor and sends the bytes ``launch.ring_allreduce_bytes`` counts; on real gloo
processes (2 and 3 ranks, spawned, bounded in time) it equals ``dist.all_reduce``."""

from __future__ import annotations

import pytest
import torch

from lmref.training import allreduce as A
from lmref.training.launch import ring_allreduce_bytes

RING_TIMEOUT_S = 120  # a hung exchange fails the test instead of the suite


def simulate_ring(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Every rank's steps of ``ring_schedule``, in lockstep in one process: the results and the
    elements each rank sent."""
    world = len(tensors)
    chunks = [t.clone().tensor_split(world) for t in tensors]
    sent = [0] * world
    schedules = [A.ring_schedule(r, world) for r in range(world)]
    for i in range(2 * (world - 1)):
        # All sends of a step leave before any arrival is applied, as with isend/irecv.
        outgoing = [chunks[r][schedules[r][i].send_chunk].clone() for r in range(world)]
        for r in range(world):
            step, left = schedules[r][i], (r - 1) % world
            assert schedules[left][i].send_chunk == step.recv_chunk  # what arrives is expected
            if step.phase == A.REDUCE_SCATTER:
                chunks[r][step.recv_chunk].add_(outgoing[left])
            else:
                chunks[r][step.recv_chunk].copy_(outgoing[left])
            sent[left] += outgoing[left].numel()
    return [torch.cat(c) for c in chunks], sent


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_the_ring_schedule_sums_every_rank_and_sends_2_n_minus_1_over_n(world):
    numel = 7 * world * 3  # divisible by the world size: equal chunks
    tensors = [A.rank_tensor(r, numel, seed=1, dtype=torch.float64) for r in range(world)]
    results, sent = simulate_ring(tensors)
    expected = torch.stack(tensors).sum(0)
    for result in results:
        torch.testing.assert_close(result, expected)
    assert all(torch.equal(r, results[0]) for r in results)  # all-gather copies: bitwise agreed
    assert [4 * n for n in sent] == [ring_allreduce_bytes(numel, world, 4)] * world
    assert len(A.ring_schedule(0, world)) == 2 * (world - 1)


@pytest.mark.unit
def test_the_ring_schedule_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="outside"):
        A.ring_schedule(2, 2)


@pytest.mark.integration  # spawns a gloo process group
@pytest.mark.parametrize("world", [2, 3])
def test_the_ring_on_real_gloo_ranks_equals_dist_all_reduce(world):
    numel = 10_001  # not a multiple of the world size: chunks of unequal length
    check = A.run_allreduce_check(world, numel, repeats=1, timeout_s=RING_TIMEOUT_S)
    difference = check.max_difference
    if world == 2:  # a + b, whichever algorithm adds them: bitwise equal
        assert difference["ring vs dist.all_reduce"] == 0.0
    assert difference["ring vs dist.all_reduce"] < 1e-5
    assert difference["all-to-one vs dist.all_reduce"] < 1e-5
    assert difference["ring vs exact sum"] < 1e-5
    assert all(check.ranks_agree.values()), check.ranks_agree
    assert check.tensor_bytes == 4 * numel
    if world == 2:
        assert check.sent["ring"] == [ring_allreduce_bytes(numel, world, 4)] * world
    else:  # unequal chunks: within one chunk's rounding of the formula
        for sent in check.sent["ring"]:
            assert abs(sent - ring_allreduce_bytes(numel, world, 4)) <= 2 * (world - 1) * 4
    assert check.sent["all-to-one"] == [(world - 1) * 4 * numel] + [4 * numel] * (world - 1)
    assert sorted(check.seconds) == sorted(A.METHODS)
