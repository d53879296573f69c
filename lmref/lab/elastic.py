"""An elastic torchrun job on this machine: two "nodes" (torchrun agents, one worker each) train
with ``--nnodes 1:2``; one node is killed mid-run, the survivor carries on alone from the last
checkpoint, then a new node joins and the job grows back to two workers.

What torchrun does (``torch.distributed.elastic.agent.server.api``, ``_invoke_run``): every
``--monitor-interval`` seconds an agent checks its workers. A failed worker (here: its peer's
collective broke when the other node died) makes the agent stop its workers and rendezvous again
(one of ``--max-restarts``); the c10d rendezvous drops the dead node once it has missed its
heartbeats (``keep_alive_interval`` x ``keep_alive_max_attempt``) and, with ``MIN`` = 1 nodes,
closes a round of one. A healthy agent that sees ``num_nodes_waiting() > 0`` (a new agent asking
to join) restarts its workers too, without spending a restart, so the next round has both.
Every new round starts the workers from scratch: ``python -m lmref.train --resume`` continues
from the newest checkpoint that verifies, resharding it to the new world size
(``torch.distributed.checkpoint`` for FSDP; one process saves a full file that FSDP loads back).

The rendezvous store lives in the first agent (``is_host``): the node killed is another one.
The agents of a job that grows disagree on the restart count (the survivor has spent one, the
newcomer none), so they run with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (see
``lmref.training.distributed.init_distributed``). The rendezvous timeouts are cut from torchrun's
defaults (join 600 s, last call 30 s, heartbeats 5 s x 3) to seconds, in ``RDZV_CONF``.

Tooling for notebook 10 and ``tests/test_elastic.py``, not for copying.

Usage::

    from lmref.lab.elastic import run_elastic

    run = run_elastic(["--model", m, "--data", d, "--max-steps", "30", "--parallel", "fsdp"],
                      out_dir, kill_at_step=5, add_at_step=9)
    run.phases()          # [(2, [1, 2, 3, 4]), (1, [5, 6, 7, 8]), (2, [9, ..., 30])]
    run.exit_codes        # {"a": 0, "c": 0} (b was killed)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmref.core.processes import stop_tree
from lmref.training.distributed import STEP_SLEEP_S
from lmref.training.launch import find_free_port, torchrun_command

ROOT = Path(__file__).resolve().parents[2]
RDZV_CONF = "join_timeout=60,last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"
ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
}


@dataclass
class ElasticRun:
    """What the job did: its metrics lines (rank 0's, as kept after the last resume), each
    agent's log and exit code (None: killed), and timed events."""

    out_dir: Path
    records: list[dict]
    logs: dict[str, str]
    exit_codes: dict[str, int | None]
    events: list[tuple[float, str]] = field(default_factory=list)

    def phases(self) -> list[tuple[int, list[int]]]:
        """(world size, steps) for each stretch of steps at one world size, as logged."""
        out: list[tuple[int, list[int]]] = []
        for r in self.records:
            if out and out[-1][0] == r["world_size"]:
                out[-1][1].append(r["step"])
            else:
                out.append((r["world_size"], [r["step"]]))
        return out

    def starts(self) -> list[str]:
        """The ``lmref.train: ... on N process(es) ...`` line of every start of the workers."""
        lines = [line for log in self.logs.values() for line in log.splitlines()]
        return [line for line in lines if line.startswith("lmref.train:") and " on " in line]

    def resumes(self) -> list[str]:
        """The loop's resume messages, from every agent's log."""
        lines = [line for log in self.logs.values() for line in log.splitlines()]
        return [line for line in lines if "resum" in line.lower() and "lmref" in line.lower()]


def read_records(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line being written
                pass
    return records


def _wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the rendezvous store on port {port} did not come up")


def run_elastic(
    train_args: list[str],
    out_dir: Path | str,
    kill_at_step: int = 5,
    add_at_step: int = 9,
    step_sleep_s: float = 0.5,
    max_restarts: int = 3,
    timeout_s: float = 120.0,
) -> ElasticRun:
    """Run ``python -m lmref.train --resume --allow-config-change --output-dir out_dir
    *train_args`` as an elastic job of 1 to 2 nodes: agents a and b start together; once rank 0
    has logged step ``kill_at_step`` at world size 2, node b (agent and worker) is killed with
    SIGKILL; once step ``add_at_step`` is logged at world size 1, agent c joins. Waits for a and c
    to exit. Within ``timeout_s`` in all (``TimeoutError``); every process started is stopped on
    the way out, whatever happens. Logs go to ``out_dir/../elastic-<agent>.log``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    args = ["-m", "lmref.train", *train_args, "--output-dir", str(out_dir)]
    args += ["--resume", "--allow-config-change", "--logging-steps", "1"]
    environ = {**os.environ, **ENV, STEP_SLEEP_S: str(step_sleep_s)}
    start, deadline = time.monotonic(), time.monotonic() + timeout_s
    agents: dict[str, subprocess.Popen] = {}
    log_paths: dict[str, Path] = {}
    events: list[tuple[float, str]] = []

    def note(what: str) -> None:
        events.append((round(time.monotonic() - start, 1), what))

    def launch(name: str, is_host: bool) -> None:
        command = torchrun_command(
            args,
            1,
            nnodes="1:2",
            rdzv_endpoint=f"127.0.0.1:{port}",
            rdzv_id=f"lmref-elastic-{port}",
            max_restarts=max_restarts,
        )
        options = ["--monitor-interval=0.5", f"--rdzv-conf={RDZV_CONF},is_host={is_host}"]
        command[3:3] = options  # after "python -m torch.distributed.run"
        log_paths[name] = out_dir.parent / f"elastic-{name}.log"
        with open(log_paths[name], "w") as log:
            agents[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=environ,
                start_new_session=True,
            )  # fmt: skip
        note(f"agent {name} started")

    def wait_for(condition, what: str) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"elastic job: timed out waiting for {what}; {events}")
            if agents["a"].poll() is not None:
                raise RuntimeError(f"agent a exited ({agents['a'].returncode}) before {what}")
            time.sleep(0.2)
        note(what)

    def logged(world: int, step: int):
        return lambda: any(
            r.get("world_size") == world and r["step"] >= step
            for r in read_records(out_dir / "metrics.jsonl")
        )

    try:
        launch("a", True)
        _wait_port(port, deadline)
        launch("b", False)
        wait_for(logged(2, kill_at_step), f"step {kill_at_step} at world size 2")
        stop_tree(agents["b"], signal.SIGKILL, grace_s=0)
        note("node b killed (SIGKILL, agent and worker)")
        wait_for(logged(1, add_at_step), f"step {add_at_step} at world size 1")
        launch("c", False)
        for name in ("a", "c"):
            agents[name].wait(timeout=max(deadline - time.monotonic(), 1))
            note(f"agent {name} exited with {agents[name].returncode}")
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"elastic job: did not finish within {timeout_s} s; {events}") from None
    finally:
        for process in agents.values():
            if process.poll() is None:
                stop_tree(process, signal.SIGTERM, grace_s=5)
    return ElasticRun(
        out_dir=out_dir,
        records=read_records(out_dir / "metrics.jsonl"),
        logs={name: path.read_text(errors="replace") for name, path in log_paths.items()},
        exit_codes={n: (None if n == "b" else p.returncode) for n, p in agents.items()},
        events=events,
    )
