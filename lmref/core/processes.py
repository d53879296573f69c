"""Child processes under a time limit: run one with its log streamed, and when the limit runs out,
report what every process of its tree was doing, then kill the whole tree.

``run_logged`` runs a command (a torchrun launch, a script) and streams its merged output line by
line. Past its time limit it records ``stack_report`` of the tree *before* killing it, so the
failure names its own cause (a rank stuck in a gloo barrier, a worker deadlocked at exit, a server
that never listened) instead of a bare "timed out". Each Python process of the tree is dumped with
``py-spy dump --native`` (Python and C++ frames: a teardown hang is usually in C++); without
py-spy, or for other programs, the report gives the kernel's wait channel and state.

Usage::

    from lmref.core.processes import run_logged, stack_report, stop_tree

    log = run_logged(["torchrun", "--nproc-per-node=2", "train.py"], timeout_s=300)
    log.check()                          # raises with the log's tail, and the stacks on a timeout

    try:                                 # any other bounded wait
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        print(stack_report(process.pid))  # every process of the tree, with its stacks
        stop_tree(process)                 # SIGTERM, then SIGKILL, to all of it
"""

from __future__ import annotations

import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants, parents first (an empty list when ``pid`` is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _py_spy() -> str | None:
    # Beside this interpreter first: a venv's console scripts are not always on PATH.
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _kernel_view(pid: int) -> str:
    """State and wait channel from /proc: what a process blocked outside Python waits on."""
    parts = []
    for name in ("wchan", "stat"):
        try:
            parts.append(f"{name}: {Path(f'/proc/{pid}/{name}').read_text().strip()}")
        except OSError:
            pass
    return "\n".join(parts)


def stack_report(pid: int, timeout_s: float = 20.0, include_root: bool = True) -> str:
    """One section per process of ``pid``'s tree: its command line, then its stacks.

    ``include_root=False`` leaves ``pid`` itself out (a test runner reporting on its children:
    its own threads are dumped by other means). Never raises: a report on a failure must not fail.
    """
    py_spy = _py_spy()
    sections = []
    tree = process_tree(pid)
    for process in tree if include_root else tree[1:]:
        try:
            command = " ".join(process.cmdline())[:300]
            header = (
                f"--- pid {process.pid} (parent {process.ppid()}, {process.status()}): {command}"
            )
        except psutil.Error as error:
            sections.append(f"--- pid {process.pid}: {error}")
            continue
        try:
            program = os.path.basename(process.exe())
        except psutil.Error:
            program = ""
        body = ""
        if py_spy and program.startswith("python"):
            try:
                run = subprocess.run(
                    [py_spy, "dump", "--native", "--pid", str(process.pid)],
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                )
                body = (run.stdout or run.stderr).strip()
            except (OSError, subprocess.TimeoutExpired) as error:
                body = f"py-spy failed: {error}"
        sections.append("\n".join(filter(None, [header, body or _kernel_view(process.pid)])))
    if not sections:
        return f"(no process left under pid {pid})"
    if not py_spy:
        sections.append("(install py-spy for Python and native stacks: pip install py-spy)")
    return "\n".join(sections)


@dataclass
class RunLog:
    """The outcome of ``run_logged``: exit status, wall time, and the output lines."""

    command: list[str]
    returncode: int | None
    seconds: float
    lines: list[str] = field(default_factory=list)
    timed_out: bool = False
    stacks: str = ""  # on timeout: what every process of the job was doing (py-spy)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def check(self) -> RunLog:
        """Raise with the log's tail when the command failed or ran out of time."""
        if not self.ok:
            status = "timed out" if self.timed_out else f"exited with status {self.returncode}"
            tail = "\n".join(self.lines[-40:])
            stacks = f"\nstacks at the timeout:\n{self.stacks}" if self.stacks else ""
            raise RuntimeError(
                f"{shlex.join(self.command)} {status} after {self.seconds:.0f}s; "
                f"log tail:\n{tail}{stacks}"
            )
        return self


def run_logged(
    command: Sequence[str],
    timeout_s: float = 300.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    echo: bool | Callable[[str], bool] = True,
    max_lines: int = 20_000,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> RunLog:
    """Run ``command``, streaming its merged stdout/stderr line by line, within ``timeout_s``.

    ``env`` adds to (not replaces) this process's environment. ``echo`` prints every line, or
    those for which it returns True. On timeout ``RunLog.stacks`` first records what each process
    of the job was doing (``stack_report``), then the process group and every descendant are
    killed, torchrun's workers included (they run in sessions of their own), so nothing outlives
    the call. ``on_start`` receives the started process (a caller running several commands at
    once in threads keeps them, to kill them all when it is interrupted).
    """
    command = [str(c) for c in command]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        errors="replace",
    )
    if on_start is not None:
        on_start(process)
    # A reader thread, because a blocking readline() could not honour the deadline.
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    log = RunLog(command, None, 0.0)
    start = time.perf_counter()
    deadline = start + timeout_s
    finished = False
    while not finished:
        try:
            line = lines.get(timeout=max(0.0, min(0.5, deadline - time.perf_counter())))
        except queue.Empty:
            if time.perf_counter() >= deadline:
                log.timed_out = True
                log.stacks = stack_report(process.pid)
                stop_tree(process)
                break
            continue
        if line is None:
            finished = True
            continue
        log.lines.append(line)
        del log.lines[:-max_lines]
        if echo is True or (callable(echo) and echo(line)):
            print(line, flush=True)
    log.returncode = process.wait()
    reader.join(timeout=5)
    log.seconds = time.perf_counter() - start
    return log


def stop_tree(
    process: subprocess.Popen, first_signal: int = signal.SIGTERM, grace_s: float = 10.0
) -> int:
    """Stop a child started in a session of its own, and everything it started; its exit code.

    ``first_signal`` goes to the process group (torchrun forwards SIGTERM to its workers; a
    server drains), then after ``grace_s`` a SIGKILL. Whatever is left in the group once the
    leader is gone (pool children) is killed, and so are the descendants found before the first
    signal: torchrun starts each worker in a session of its own, out of reach of ``killpg``.
    Safe to repeat.
    """
    descendants = process_tree(process.pid)[1:] if process.poll() is None else []
    for sig, grace in ((first_signal, grace_s), (signal.SIGKILL, 5.0)):
        _signal_group(process.pid, sig)
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(process.pid, signal.SIGKILL)
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:  # gone already
            pass
    return process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone (its id may be reused)
        pass
