"""Real servers on loopback for tests and notebooks: Redis, RabbitMQ, nginx and Python processes.

Each ``start_*`` launches one Debian-packaged server (``redis-server``, ``rabbitmq-server``,
``nginx``) or a Python module as a child process on 127.0.0.1, on a free port, with its files in
a temporary folder, waits until it answers, and returns a ``Service`` whose ``stop()`` ends it and
everything it started (its own process group). ``Services`` stops a group in reverse order, so a
``with`` block leaves no process behind even when the block fails. Standard library only.

Usage::

    from lmref.lab.services import Services, start_rabbitmq, start_redis

    with Services() as services:
        redis = services.add(start_redis())              # redis.url: redis://127.0.0.1:PORT/0
        rabbit = services.add(start_rabbitmq())          # rabbit.url: amqp://guest:guest@...
        replica = services.add(start_replica("base=artifacts/base"))   # python -m lmref.serve
        lb = services.add(start_nginx([f"127.0.0.1:{replica.port}"]))  # lb.url
        worker = services.add(start_celery_worker("lmref.production.batch", "w1", env={...}))
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
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable


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
    ):
        self.name, self.url, self.port, self.stop_signal = name, url, port, stop_signal
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"lmref-{name}-")
        self._owns_workdir = workdir is None
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
        """SIGKILL to the whole group: a machine that dies, nothing gets to clean up."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self._signal_group(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        # The leader is gone; children it left in the group (pool processes) go too.
        self._signal_group(signal.SIGKILL)
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


def start_redis(timeout: float = 30.0) -> Service:
    """``redis-server`` with no persistence: a cache and result store that starts empty."""
    port, workdir = free_port(), tempfile.mkdtemp(prefix="lmref-redis-")
    service = Service(
        "redis",
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            workdir,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        workdir=workdir,
        url=f"redis://127.0.0.1:{port}/0",
        port=port,
    )
    service._owns_workdir = True
    return service.wait_until(lambda: service.seen("Ready to accept connections"), timeout)


def start_rabbitmq(timeout: float = 90.0) -> Service:
    """``rabbitmq-server`` (Erlang) with its node name, ports, database and logs private to this
    run, no plugins. Boot takes several seconds (about 6-7 s on a 2-core machine)."""
    workdir = tempfile.mkdtemp(prefix="lmref-rabbitmq-")
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    node = f"lmref{port}@localhost"
    config = os.path.join(workdir, "rabbitmq")
    with open(config + ".conf", "w") as f:
        f.write(f"listeners.tcp.default = 127.0.0.1:{port}\n")
    env = {
        "HOME": workdir,
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": config,
        "RABBITMQ_MNESIA_BASE": os.path.join(workdir, "mnesia"),
        "RABBITMQ_LOG_BASE": os.path.join(workdir, "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(workdir, "enabled_plugins"),
        "RABBITMQ_ENABLED_PLUGINS": "",
    }
    # Erlang's name server (epmd) would otherwise be started as a daemon that outlives the
    # broker: started here on a private port, as our child, it is stopped with the broker.
    epmd = Service(
        "epmd", [_erlang_tool("epmd"), "-port", str(epmd_port)], workdir=workdir, port=epmd_port
    ).wait_until(lambda: port_open(epmd_port), 30)
    server = _rabbitmq_server()

    def after() -> None:
        epmd.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    service = Service(
        "rabbitmq",
        [server],
        env=env,
        workdir=workdir,
        port=port,
        url=f"amqp://guest:guest@127.0.0.1:{port}//",
        after_stop=after,
    )
    try:
        return service.wait_until(lambda: service.seen("Server startup complete"), timeout)
    except Exception:
        service.stop()
        raise


def _erlang_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    import glob

    candidates = sorted(glob.glob(f"/usr/lib/erlang/erts-*/bin/{name}"))
    if not candidates:
        raise FileNotFoundError(f"{name} not found: install rabbitmq-server (make system)")
    return candidates[-1]


def _rabbitmq_server() -> str:
    # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user; the script under
    # /usr/lib/rabbitmq/bin runs the broker as whoever calls it.
    for path in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
        if path and os.path.exists(path):
            return path
    raise FileNotFoundError("rabbitmq-server not found: install it (make system)")


def start_nginx(
    upstreams: list[str], timeout: float = 30.0, max_fails: int = 1, fail_timeout_s: int = 10
) -> Service:
    """nginx as a load balancer (round robin) over ``upstreams`` ("127.0.0.1:PORT" each), with
    passive health checks: a replica that refuses connections is skipped for
    ``fail_timeout_s``. Streaming responses pass through unbuffered."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="lmref-nginx-")
    os.chmod(workdir, 0o755)  # nginx's workers may run as another user (nobody, under root)
    servers = "\n".join(
        f"        server {u} max_fails={max_fails} fail_timeout={fail_timeout_s}s;"
        for u in upstreams
    )
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 1m;  # uploads (batch files) up to 1 MiB stay in memory
    upstream replicas {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
            # POST is not idempotent: nginx retries it on the next replica only when the
            # connection failed before the request was sent (the default), never mid-request.
            proxy_next_upstream error timeout http_503;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
""")
    service = Service(
        "nginx",
        ["nginx", "-p", workdir, "-c", conf, "-g", "daemon off;"],
        workdir=workdir,
        port=port,
        url=f"http://127.0.0.1:{port}",
        stop_signal=signal.SIGQUIT,
    )
    service._owns_workdir = True
    return service.wait_until(lambda: port_open(port), timeout)


def start_python(
    name: str,
    args: list[str],
    env: dict | None = None,
    ready_url: str = "",
    ready_text: str = "",
    timeout: float = 180.0,
    url: str = "",
    port: int = 0,
) -> Service:
    """``python <args>`` (this interpreter) with OMP_NUM_THREADS=1 unless ``env`` says otherwise,
    ready when ``ready_url`` answers 200 or ``ready_text`` appears in its output."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    service = Service(name, [sys.executable, *args], env=env, url=url, port=port)
    if ready_url:
        return service.wait_until(lambda: http_ok(ready_url), timeout)
    if ready_text:
        return service.wait_until(lambda: service.seen(ready_text), timeout)
    return service


def start_replica(
    model: str, extra_args: list[str] = (), env: dict | None = None, timeout: float = 180.0
) -> Service:
    """``python -m lmref.serve --model MODEL`` on a free port, ready when ``/ready`` says 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start_python(
        f"replica-{port}",
        ["-m", "lmref.serve", "--model", model, "--port", str(port), *extra_args],
        env=env,
        ready_url=url + "/ready",
        timeout=timeout,
        url=url,
        port=port,
    )


def start_celery_worker(
    app: str,
    name: str,
    env: dict | None = None,
    concurrency: int = 1,
    pool: str = "prefork",
    timeout: float = 180.0,
    ready_text: str = " ready.",
    wait: bool = True,
) -> Service:
    """``celery -A app worker`` named ``name@host``, one pool process by default, ready when
    ``ready_text`` appears in its log. Celery's own " ready." comes before its pool processes
    have run their ``worker_process_init`` handlers (a model loading): an app that loads one
    there prints its own line (``lmref.production.batch.READY_LINE``). ``wait=False``: return at once
    (start several, then ``wait_for_text`` on each)."""
    return start_python(
        name,
        [
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env=env,
        ready_text=ready_text if wait else "",
        timeout=timeout,
    )
