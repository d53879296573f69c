"""Starters for the real servers the tests and notebooks use, each on 127.0.0.1 and a free port:
Redis, RabbitMQ (with its own epmd), nginx as a load balancer, Python processes, ``lmref.serve``
replicas and Celery workers. Each returns a ``lmref.lab.services.Service`` once the server
answers; ``Services`` stops them together. Debian's packages (``make system``) and the standard
library only.

Usage::

    from lmref.lab.servers import start_nginx, start_redis, start_replica
    from lmref.lab.services import Services

    with Services() as services:
        redis = services.add(start_redis())                            # redis.url
        replica = services.add(start_replica("base=artifacts/base"))   # python -m lmref.serve
        lb = services.add(start_nginx([f"127.0.0.1:{replica.port}"]))  # lb.url
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
import tempfile

from lmref.lab.services import Service, free_port, http_ok, port_open
from lmref.lab.tls import Certificates


def start_redis(
    timeout: float = 30.0,
    args: list[str] | None = None,
    port: int = 0,
    workdir: str | None = None,
    password: str | None = None,
) -> Service:
    """``redis-server`` with no persistence by default: a cache that starts empty. ``args``:
    more settings, later ones winning (``["--appendonly", "yes"]``: a store that keeps its
    data in ``workdir`` across a restart on the same ``port``; the caller then owns
    ``workdir``). A password (``requirepass``) by default: one generated per server, or
    ``password``; ``""`` for none. A server started again in the same ``workdir`` keeps the
    password it had there, as it keeps its data, so the clients' URL still works. The url
    carries it: ``redis://:PASSWORD@127.0.0.1:PORT/0``."""
    port = port or free_port()
    owned = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="lmref-redis-")
    # In a config file (0600), not on the command line that ps shows every user.
    conf = os.path.join(workdir, "lmref-redis.conf")
    if password is None:
        password = _saved_password(conf) if os.path.exists(conf) else secrets.token_hex(16)
    _write_private(conf, f"requirepass {password}\n" if password else "")
    command = ["redis-server", conf, "--bind", "127.0.0.1", "--port", str(port), "--dir", workdir]
    command += ["--save", "", "--appendonly", "no", *(args or [])]
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{port}/0"
    service = Service("redis", command, workdir=workdir, url=url, port=port, owns_workdir=owned)
    service.password = password
    return service.wait_until(lambda: service.seen("Ready to accept connections"), timeout)


def _saved_password(conf: str) -> str:
    with open(conf) as f:
        words = f.read().split()
    return words[words.index("requirepass") + 1] if "requirepass" in words else ""


def _write_private(path: str, text: str) -> None:
    """A file only its owner reads: it holds a password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def start_rabbitmq(
    timeout: float = 90.0, username: str = "lmref", password: str | None = None
) -> Service:
    """``rabbitmq-server`` (Erlang) with its node name, ports, database and logs private to this
    run, no plugins. Boot takes several seconds (about 6-7 s on a 2-core machine). Its one user
    is ``username`` with ``password`` (default: generated per run); ``guest`` does not exist
    (RabbitMQ creates it only as the default user). The url carries them."""
    workdir = tempfile.mkdtemp(prefix="lmref-rabbitmq-")
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    node = f"lmref{port}@localhost"
    config = os.path.join(workdir, "rabbitmq")
    password = password or secrets.token_hex(16)
    # The default user is created with the database, on first boot: this run's, in its own
    # folder. The file is 0600: it holds the password.
    _write_private(
        config + ".conf",
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        f"default_user = {username}\ndefault_pass = {password}\n"
        "default_permissions.configure = .*\ndefault_permissions.read = .*\n"
        "default_permissions.write = .*\n",
    )
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
        url=f"amqp://{username}:{password}@127.0.0.1:{port}//",
        after_stop=after,
    )
    service.password = password
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


# The X-Request-ID nginx keeps, as the replica does (lmref.serving.audit.SAFE_ID, a test holds
# them equal): an id one of them kept and the other replaced would name two ids for one request.
REQUEST_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
# One JSON object a line (escape=json: a client's header cannot break the line). The request id
# is the client's X-Request-ID when it is a plain token, else nginx's own; the same id goes to
# the replica (which logs it) and back to the client. No header holding a credential is logged
# (Authorization, cookies), nor the query string, which some clients put tokens in.
ACCESS_LOG_FORMAT = (
    '{"time":"$time_iso8601","request_id":"$lmref_request_id","client":"$remote_addr",'
    '"method":"$request_method","uri":"$uri","status":$status,"bytes":$body_bytes_sent,'
    '"upstream":"$upstream_addr","upstream_status":"$upstream_status",'
    '"request_time":$request_time,"upstream_time":"$upstream_response_time",'
    '"tls":"$ssl_protocol","user_agent":"$http_user_agent"}'
)


def start_nginx(
    upstreams: list[str],
    timeout: float = 30.0,
    max_fails: int = 1,
    fail_timeout_s: int = 10,
    tls: Certificates | None = None,
) -> Service:
    """nginx as a load balancer (round robin) over ``upstreams`` ("127.0.0.1:PORT" each), with
    passive health checks: a replica that refuses connections is skipped for
    ``fail_timeout_s``. Streaming responses pass through unbuffered. ``tls``
    (``lmref.lab.tls.make_certificates()``): it listens with TLS 1.2 or 1.3 only, url
    ``https://127.0.0.1:PORT``; plain HTTP to that port gets a 400. Each request is a JSON line
    in ``service.access_log`` (a file in its workdir: read it before ``stop()``)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="lmref-nginx-")
    os.chmod(workdir, 0o755)  # nginx's workers may run as another user (nobody, under root)
    servers = "\n".join(
        f"        server {u} max_fails={max_fails} fail_timeout={fail_timeout_s}s;"
        for u in upstreams
    )
    listen = f"listen 127.0.0.1:{port};"
    if tls is not None:
        listen = f"""listen 127.0.0.1:{port} ssl;
        ssl_certificate {tls.server_cert};
        ssl_certificate_key {tls.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:lmref_tls:1m;"""
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    map $http_x_request_id $lmref_request_id {{
        "~^{REQUEST_ID_PATTERN}$" $http_x_request_id;
        default $request_id;
    }}
    log_format lmref_json escape=json '{ACCESS_LOG_FORMAT}';
    access_log {workdir}/access.log lmref_json;
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
        {listen}
        # Set here, for both locations (a location with a proxy_set_header of its own would
        # drop these). The replica's echo of the id is hidden and nginx's added: the same value,
        # and a 502 or 504 from nginx itself carries it too.
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Request-ID $lmref_request_id;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_hide_header X-Request-ID;
        location / {{
            proxy_pass http://replicas;
            proxy_buffering off;
            proxy_read_timeout 300s;
            # POST is not idempotent: nginx retries it on the next replica only when the
            # connection failed before the request was sent (the default), never mid-request.
            proxy_next_upstream error timeout http_503;
            add_header X-Upstream $upstream_addr always;
            add_header X-Request-ID $lmref_request_id always;
        }}
        # The Batch API answers 503 when its store or queue is down: the same for every
        # replica, so not a reason to mark this one failed (max_fails) and route the online
        # API around it; the client gets the 503 and its Retry-After.
        location ~ ^/v1/(batches|files) {{
            proxy_pass http://replicas;
            proxy_read_timeout 300s;
            proxy_next_upstream error timeout;
            add_header X-Upstream $upstream_addr always;
            add_header X-Request-ID $lmref_request_id always;
        }}
    }}
}}
""")
    scheme = "https" if tls is not None else "http"
    service = Service(
        "nginx",
        ["nginx", "-p", workdir, "-c", conf, "-g", "daemon off;"],
        workdir=workdir,
        port=port,
        url=f"{scheme}://127.0.0.1:{port}",
        stop_signal=signal.SIGQUIT,
        owns_workdir=True,
    )
    service.access_log = os.path.join(workdir, "access.log")
    service.error_log = os.path.join(workdir, "error.log")
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
    there prints its own line (``lmref.production.worker.READY_LINE``). ``wait=False``: return at once
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
