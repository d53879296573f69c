"""Real servers on loopback for tests and notebooks: a child process with a URL, and a group of them.

Each ``start_*`` of ``lmref.lab.servers`` launches one Debian-packaged server (``redis-server``,
``rabbitmq-server``, ``nginx``) or a Python module as a child process on 127.0.0.1, on a free
port, with its files in a temporary folder, waits until it answers, and returns a ``Service``
(here) whose ``stop()`` ends it and everything it started (its own process group). ``Services``
stops a group in reverse order, so a ``with`` block leaves no process behind even when the block
fails; ``remaining`` lists what outlived a stop. Standard library only.

Usage::

    from lmref.lab.servers import (start_celery_worker, start_nginx, start_rabbitmq, start_redis,
                                   start_replica)
    from lmref.lab.services import Services

    with Services() as services:
        redis = services.add(start_redis())              # redis.url: redis://:PASSWORD@127.0.0.1:PORT/0
        rabbit = services.add(start_rabbitmq())          # rabbit.url: amqp://lmref:PASSWORD@...
        replica = services.add(start_replica("base=artifacts/base"))   # python -m lmref.serve
        lb = services.add(start_nginx([f"127.0.0.1:{replica.port}"]))  # lb.url
        worker = services.add(start_celery_worker("lmref.production.celery_worker", "w1", env={...}))
    # everything stopped here
"""

from __future__ import annotations

import atexit
import collections
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable

from lmref.core.credentials import redact
from lmref.core.processes import stop_tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Service:
    """One child process (and its process group) with a URL; ``stop()`` is safe to repeat."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict | None = None,
        workdir: str | None = None,
        url: str = "",
        port: int = 0,
        stop_signal: int = signal.SIGTERM,
        after_stop: Callable[[], None] | None = None,
        owns_workdir: bool | None = None,
    ):
        self.name, self.url, self.port, self.stop_signal = name, url, port, stop_signal
        self.password = ""  # a server's own (Redis, RabbitMQ): in its url, never in a log line
        # Removed on stop when made here, or when the starter made it for the server's files
        # before the command line could name it (owns_workdir=True).
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"lmref-{name}-")
        self._owns_workdir = workdir is None if owns_workdir is None else owns_workdir
        self._after_stop = after_stop
        self.output: collections.deque[str] = collections.deque(maxlen=400)
        self.started = time.monotonic()
        self.ready_s: float | None = None
        # A session of its own: stop() reaches every process the server forks (nginx workers,
        # Celery pool children, Erlang helpers) through the group, and ^C in a notebook does not.
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=os.getcwd(),
            start_new_session=True,
        )
        self.pid = self.proc.pid
        threading.Thread(target=self._drain, daemon=True).start()

    def __repr__(self) -> str:  # a notebook shows this: no password in it
        return f"<Service {self.name} pid={self.pid} {redact(self.url) or ''}>"

    def _drain(self) -> None:  # keeps the pipe empty so the child never blocks on a full pipe
        for line in self.proc.stdout:
            self.output.append(line.rstrip())

    def wait_until(self, check: Callable[[], bool], timeout: float) -> Service:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n" + "\n".join(self.output)
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"{self.name} not ready after {timeout} s:\n" + "\n".join(self.output)
                )
            time.sleep(0.1)
        self.ready_s = time.monotonic() - self.started
        return self

    def wait_for_text(self, text: str, timeout: float = 180.0) -> Service:
        """Wait until ``text`` appears in the output (a server's "ready" line)."""
        return self.wait_until(lambda: self.seen(text), timeout)

    def seen(self, text: str) -> bool:
        return any(text in line for line in list(self.output))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole tree: a machine that dies, nothing gets to clean up."""
        stop_tree(self.proc, signal.SIGKILL)

    def stop(self, timeout: float = 30.0) -> int:
        """``stop_signal``, up to ``timeout`` s to finish, then SIGKILL: the whole tree goes."""
        stop_tree(self.proc, self.stop_signal, timeout)
        if self._after_stop is not None:
            self._after_stop()
            self._after_stop = None
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode


def remaining(sessions: list[int]) -> list[int]:
    """Processes still running (zombies aside) in these sessions: a ``Service``'s session id is
    its pid, so ``remaining([s.pid for s in started])`` lists what outlived its stop()."""
    left = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z" and int(fields[3]) in sessions:
            left.append(int(entry))
    return left


class Services:
    """Services started together, stopped together in reverse order (a context manager)."""

    def __init__(self) -> None:
        self.items: list[Service] = []
        # A notebook or script that stops with an error never reaches its stop(): the servers
        # are in sessions of their own, so nothing else would end them.
        atexit.register(self.stop)

    def add(self, service: Service) -> Service:
        self.items.append(service)
        return service

    def stop(self) -> None:
        while self.items:
            self.items.pop().stop()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
