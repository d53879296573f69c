"""Measure one training step of a tiny Llama under DDP, ZeRO-1, FSDP2 and TP, and a GPipe
pipeline's bubble, on real torchrun ranks; every rank writes what it measured to JSON.

The torchrun worker (``python -m lmref.lab.parallel_probe``) runs each scheme in turn in one
process group: a warm-up step (FSDP2's lazy init, DDP's first-iteration bookkeeping), then a
measured step with a ``CommCounter`` around forward, backward and ``optimizer.step()``, and
``held_bytes`` after the step. ``run_probe`` launches it and returns the ranks' records, which
``benchmarks/parallel_costs.py`` and ``tests/test_parallel_costs.py`` compare with
``lmref.training.parallel_costs``. Tooling for those two and notebook 10, not for copying.

Usage::

    from lmref.lab.parallel_probe import run_probe

    ranks = run_probe(["ddp", "fsdp", "tp"], world=2, timeout_s=180)
    ranks[0]["fsdp"]["held"]["params"], ranks[0]["fsdp"]["comm"]["backward"]
    ranks = run_probe(["pp"], microbatches=(1, 2, 4, 8), repeats=3)   # ranks[r]["pp"]["1"] ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from lmref.core.processes import run_logged
from lmref.core.ranks import rank_and_world
from lmref.training import parallel_costs as C
from lmref.training.distributed import distributed, wrap_model
from lmref.training.launch import torchrun_command
from lmref.training.parallel_measure import CommCounter, StageTimer, bubble_from_times, held_bytes

SCHEMES = ("ddp", "zero1", "fsdp", "fsdp-noreshard", "tp", "pp")
# The tiny model of the distributed tests: 2 layers, hidden 64, 16-token blocks.
BATCH, SEQ, VOCAB, HIDDEN, LAYERS = 2, 16, 512, 64, 2
ROOT = Path(__file__).resolve().parents[2]


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def model_counts(model: torch.nn.Module) -> dict:
    """Parameter counts the formulas need: total; the root FSDP unit's (everything outside the
    decoder layers)."""
    total = sum(p.numel() for p in model.parameters())
    layers = sum(p.numel() for p in model.model.layers.parameters())
    return {
        "params": total,
        "tensors": len(list(model.parameters())),  # AdamW keeps a 4-byte step for each
        "root_params": total - layers,
    }


def replicated_params(model: torch.nn.Module) -> int:
    """Parameters a tensor-parallel plan left whole on every rank (plain tensors, not DTensors):
    norms and embeddings."""
    from torch.distributed.tensor import DTensor

    return sum(p.numel() for p in model.parameters() if not isinstance(p, DTensor))


def _place(scheme: str, model: torch.nn.Module, env):
    """The model and its AdamW as ``scheme`` places them on this rank."""
    if scheme in ("ddp", "zero1"):
        # Gradients as views of DDP's buckets: one copy, which held_bytes then sees whole.
        model = wrap_model(model, env, gradient_as_bucket_view=True)
        if scheme == "zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return model, ZeroRedundancyOptimizer(
                model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3
            )
    elif scheme.startswith("fsdp") or scheme == "tp":
        # The training loop's own plans (lmref.training.parallel): fully_shard per decoder layer
        # and the root; Megatron's column/row split. fsdp-noreshard keeps gathered weights
        # until backward.
        from lmref.training.parallel import ParallelConfig, make_plan

        config = ParallelConfig(
            parallel="tp" if scheme == "tp" else "fsdp",
            reshard_after_forward=scheme != "fsdp-noreshard",
        )
        model = make_plan(config, model.config).apply(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def measure_scheme(scheme: str, env) -> dict:
    """One warm-up step, then one measured: collectives per phase, bytes held after the step."""
    model = tiny_llama()
    counts = model_counts(model)
    model, optimizer = _place(scheme, model, env)
    if scheme == "tp":
        counts["tp_replicated"] = replicated_params(model)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second step is the one measured
        optimizer.zero_grad(set_to_none=False)  # DDP's bucket views stay in place
        counters = {phase: CommCounter(phase) for phase in ("forward", "backward", "step")}
        with counters["forward"]:
            loss = model(input_ids=ids, labels=ids).loss
        # What the parameters hold between forward and backward: FSDP2's gathered weights.
        params_after_forward = held_bytes(model).params
        with counters["backward"]:
            loss.backward()
        with counters["step"]:
            optimizer.step()
    held = held_bytes(model, optimizer)
    return {
        **counts,
        "held": {"params": held.params, "grads": held.grads, "optimizer": held.optimizer},
        "params_after_forward": params_after_forward,
        "comm": {phase: c.summary() for phase, c in counters.items()},
        "written_bytes": {phase: c.written_bytes for phase, c in counters.items()},
        "loss": loss.item(),
    }


def gloo_wire_bytes(numel: int = 1 << 18) -> dict:
    """Bytes this process writes for each collective over ``numel`` fp32 values: what gloo's
    algorithms put on the wire, beside the ring's numbers."""
    world, out = rank_and_world()[1], {}
    full, shard = torch.ones(numel), torch.ones(numel // world)
    calls = {
        "all-reduce": lambda: dist.all_reduce(full),
        "all-gather": lambda: dist.all_gather_into_tensor(full, shard),
        "reduce-scatter": lambda: dist.reduce_scatter_tensor(shard, full),
        "broadcast": lambda: dist.broadcast(full, src=0),
    }
    for kind, call in calls.items():
        dist.barrier()
        with CommCounter() as counter:
            call()
        out[kind] = {"payload_bytes": numel * 4, "written_bytes": counter.written_bytes}
    return out


# ---------------------------------------------------------------- pipeline bubble

PP_WIDTH, PP_LAYERS, PP_ROWS = 512, 4, 2048  # a stage: 4 Linear(512, 512); 2048 rows a step


class _Sleep(torch.autograd.Function):
    """Stands for compute without using a core: forward sleeps ``seconds``, backward twice that
    (a backward costs about two forwards). On a shared 2-core machine two stages computing at
    once slow each other down, which the bubble formula does not model; sleeping stages measure
    the schedule alone."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class SleepStage(torch.nn.Module):
    """A stage whose forward takes ``step_forward_s`` x (its rows / ``PP_ROWS``) seconds."""

    def __init__(self, step_forward_s: float) -> None:
        super().__init__()
        self.step_forward_s = step_forward_s
        self.scale = torch.nn.Parameter(torch.ones(PP_WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x * self.scale, self.step_forward_s * x.shape[0] / PP_ROWS)


def measure_bubble(
    env, microbatches: Sequence[int], repeats: int, sleep_s: float | None = None
) -> dict:
    """GPipe over ``env.world_size`` equal stages (the formula's premise), the same global batch
    cut into m micro-batches: per m, each step's wall time and this stage's compute time.
    Stages are 4 Linear(512, 512) + tanh, or with ``sleep_s`` a ``SleepStage`` whose forward of
    a whole step's rows takes ``sleep_s``."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.manual_seed(env.rank)
    if sleep_s:
        stage_module = SleepStage(sleep_s)
    else:
        layers = [(torch.nn.Linear(PP_WIDTH, PP_WIDTH), torch.nn.Tanh()) for _ in range(PP_LAYERS)]
        stage_module = torch.nn.Sequential(*[m for pair in layers for m in pair])
    x = torch.randn(PP_ROWS, PP_WIDTH, generator=torch.Generator().manual_seed(0))
    out = {}
    for m in microbatches:
        stage = PipelineStage(stage_module, env.rank, env.world_size, torch.device("cpu"))
        timer = StageTimer(stage)
        schedule = ScheduleGPipe(stage, m, loss_fn=lambda y, _t: y.pow(2).mean())
        steps = []
        for i in range(repeats + 1):  # the first step (shape exchange, allocations) not kept
            dist.barrier()
            timer.reset()
            start = time.perf_counter()
            if stage.is_first:
                schedule.step(x)
            elif stage.is_last:
                schedule.step(target=x)
            else:
                schedule.step()
            # The step ends when the last stage's last backward does: the first stage's last
            # backward comes after the last stage has finished, so every rank waits for all.
            dist.barrier()
            wall = time.perf_counter() - start
            if i:
                busy = timer.busy_seconds()
                chunks = [kind for kind, _, _ in timer.intervals]
                steps.append(
                    {
                        "wall_s": wall,
                        "busy_s": busy,
                        "bubble": bubble_from_times(busy, wall),
                        "forward_chunks": chunks.count("forward"),
                        "backward_chunks": chunks.count("backward"),
                    }
                )
        out[str(m)] = steps
    return out


# ---------------------------------------------------------------- measured against theory


def _comm(record: dict, phase: str, kind: str) -> int:
    return sum(r["payload_bytes"] for r in record["comm"][phase] if r["kind"] == kind)


def memory_rows(rank: dict, world: int) -> list[dict]:
    p, steps = rank["ddp"]["params"], 4 * rank["ddp"]["tensors"]
    theory = {
        "ddp": C.memory_per_rank("ddp", p, world),
        "zero1": C.memory_per_rank("zero1", p, world),
        "fsdp": C.memory_per_rank("zero3", p, world),
        "tp": C.memory_per_rank("tp", p, world, replicated=rank["tp"]["tp_replicated"]),
    }
    rows = []
    for scheme, expected in theory.items():
        held = rank[scheme]["held"]
        for part in ("params", "grads", "optimizer"):
            want = getattr(expected, part)
            rows.append(
                {
                    "scheme": scheme,
                    "part": part,
                    "measured_bytes": held[part],
                    "theory_bytes": want,
                    "ratio": held[part] / want,
                    "note": f"optimizer includes AdamW's 4-byte step a tensor ({steps} bytes)"
                    if part == "optimizer"
                    else "",
                }
            )
    return rows


def comm_rows(rank: dict, world: int) -> list[dict]:
    p = rank["ddp"]["params"]
    fwd, bwd, rs = C.fsdp_traffic(p, world, units=LAYERS + 1)
    tp_f, tp_b = C.tp_traffic(BATCH, SEQ, HIDDEN, LAYERS, world, backward_per_block=5)
    gloo_rs = C.ring_send_bytes(C.ALL_REDUCE, rs.payload_bytes, world)  # gloo: an all-reduce
    checks = [
        ("ddp", "backward", [C.ddp_traffic(p, world)[0]], 0),
        ("fsdp", "forward", [fwd], 0),
        ("fsdp", "backward", [bwd, rs], gloo_rs - rs.wire_bytes),
        ("fsdp-noreshard", "backward", [rs], gloo_rs - rs.wire_bytes),
        ("tp", "forward", [tp_f], 0),
        ("tp", "backward", [tp_b], 0),
        ("zero1", "step", C.zero1_traffic(p, world)[1:], 0),
    ]
    rows = []
    for scheme, phase, expected, gloo_extra in checks:
        payload = sum(_comm(rank[scheme], phase, c.kind) for c in expected)
        ring = sum(c.wire_bytes for c in expected)
        written = rank[scheme]["written_bytes"][phase]
        rows.append(
            {
                "scheme": scheme,
                "phase": phase,
                "collectives": [f"{c.kind} x{c.calls}" for c in expected],
                "payload_measured": payload,
                "payload_theory": sum(c.payload_bytes for c in expected),
                "sent_measured": written,
                "sent_ring_theory": ring,
                "sent_gloo_theory": ring + gloo_extra,
                "sent_ratio_to_gloo_theory": written / (ring + gloo_extra),
            }
        )
    return rows


def bubble_rows(ranks: list[dict], kind: str, stages: int) -> list[dict]:
    rows = []
    for m in ranks[0][kind]:
        bubbles = [s["bubble"] for r in ranks for s in r[kind][m]]
        busy = [s["busy_s"] for r in ranks for s in r[kind][m]]
        rows.append(
            {
                "microbatches": int(m),
                "bubble_median": statistics.median(bubbles),
                "bubble_range": [min(bubbles), max(bubbles)],
                "theory": C.bubble_fraction(stages, int(m)),
                "busy_s_median": statistics.median(busy),
                "wall_s_median": statistics.median(s["wall_s"] for r in ranks for s in r[kind][m]),
            }
        )
    return rows


# ---------------------------------------------------------------- worker and launcher


def worker(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--microbatches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pp-sleep-s", type=float, default=0.2, help="a SleepStage's step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with distributed(timeout_s=120) as env:
        record: dict = {"rank": env.rank, "world": env.world_size}
        for scheme in args.schemes:
            if scheme == "pp":
                record["pp"] = measure_bubble(env, args.microbatches, args.repeats)
                record["pp-sleep"] = measure_bubble(
                    env, args.microbatches, args.repeats, args.pp_sleep_s
                )
            else:
                record[scheme] = measure_scheme(scheme, env)
        record["gloo"] = gloo_wire_bytes()
        Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(record))


def run_probe(
    schemes: Sequence[str] = SCHEMES,
    world: int = 2,
    microbatches: Sequence[int] = (1, 2, 4, 8),
    repeats: int = 3,
    pp_sleep_s: float = 0.2,
    timeout_s: float = 300.0,
) -> list[dict]:
    """Launch the worker with torchrun (``world`` processes, one thread each, gloo) within
    ``timeout_s``; the ranks' records, rank 0 first. A failed launch raises with its log."""
    with tempfile.TemporaryDirectory(prefix="parallel-probe-") as out:
        args = ["-m", "lmref.lab.parallel_probe", "--out", out, "--schemes", *schemes]
        args += ["--microbatches", *map(str, microbatches), "--repeats", str(repeats)]
        args += ["--pp-sleep-s", str(pp_sleep_s)]
        environ = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        log = run_logged(
            torchrun_command(args, world), timeout_s, env=environ, cwd=ROOT, echo=False
        )
        log.check()
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


if __name__ == "__main__":
    worker()
