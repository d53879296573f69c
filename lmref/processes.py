"""What a process and its children are doing right now: the report a bounded wait prints on timeout.

A launcher or a test that waits on a child with a time limit calls ``stack_report(pid)`` when the
limit runs out, *before* killing it, so the failure names its own cause (a rank stuck in a gloo
barrier, an interpreter waiting on a thread at exit, a server that never listened) instead of a
bare "timed out". Each Python process of the tree is dumped with ``py-spy dump --native`` (Python
and C++ frames: a teardown hang is usually in C++); without py-spy, or for other programs, the
report gives the kernel's wait channel and state.

Usage::

    from lmref.processes import stack_report

    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        print(stack_report(process.pid))    # every process of the tree, with its stacks
        process.kill()
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
            header = f"--- pid {process.pid} (parent {process.ppid()}, {process.status()}): {command}"
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
                run = subprocess.run([py_spy, "dump", "--native", "--pid", str(process.pid)],
                                     capture_output=True, text=True, timeout=timeout_s)
                body = (run.stdout or run.stderr).strip()
            except (OSError, subprocess.TimeoutExpired) as error:
                body = f"py-spy failed: {error}"
        sections.append("\n".join(filter(None, [header, body or _kernel_view(process.pid)])))
    if not sections:
        return f"(no process left under pid {pid})"
    if not py_spy:
        sections.append("(install py-spy for Python and native stacks: pip install py-spy)")
    return "\n".join(sections)

