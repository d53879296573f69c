"""Load testing an OpenAI-compatible server: start one as a child process, drive it, time it.

Not part of the server: tools for benchmarks, notebooks and tests, on the standard library and
``lmref.lab.services`` (the child process itself), for any server that prints a JSON "listening"
line and has ``GET /ready`` (``python -m lmref.serve`` does both).

- ``spawn_server(args)``: ``python -m lmref.serve <args>`` on a free port, waits for /ready;
  ``.stop()`` sends SIGTERM and waits for the drain.
- ``stream_completion(url, body)``: one streaming ``/v1/completions`` (or chat) call, timed.
- ``drain(jobs, clients, send)``: the closed loop itself, for any request function.
- ``run_load(url, prompts, concurrency)``: ``drain`` over streaming completions (``chat=True``:
  each prompt a user message to ``/v1/chat/completions``); requests/s, output tokens/s, TTFT,
  TPOT and end-to-end p50/p99 (the numbers vLLM's serving benchmark reports).
- ``load_curve(targets, prompts, clients, repeats)``: ``run_load`` at each number of clients
  against each server (e.g. continuous vs static batching), alternating within a repeat; one
  row per run.
- ``closed_loop(url, body, clients, seconds)``: the same request back to back for a while, each
  one's outcome kept (status or error, which upstream answered): what fails when a replica dies.
- ``MetricsRecorder(url, names)``: scrapes ``/metrics`` in a thread, a time series of the named
  metrics (summed over their labels), e.g. a queue depth going down.

Usage::

    from lmref.lab.loadtest import run_load, spawn_server

    with spawn_server(["--model", "base=artifacts/base"], env={"LMREF_API_KEYS": ""}) as server:
        print(run_load(server.url, ["def add(", "class Stack"] * 8, concurrency=4, max_tokens=16))
        rows = load_curve({"continuous": server.url}, ["def add("] * 8, clients=[1, 4], repeats=3)
"""

from __future__ import annotations

import collections
import http.client
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from lmref.lab.services import Service


class ServerProcess:
    """A server in a child process (``python -m lmref.serve ...``): its URL, and a clean stop.

    A ``lmref.lab.services.Service`` underneath (its own process group, its output drained in a
    thread); ``proc`` and ``output`` are the Service's.
    """

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 180.0):
        self.service = Service("server", args, env=env)
        self.proc, self.output = self.service.proc, self.service.output
        self.service.wait_until(lambda: self._listening_url() is not None, timeout)
        self.url = self._listening_url()

    def _listening_url(self) -> str | None:
        """The URL of the server's JSON "listening" line, once printed."""
        for line in list(self.output):
            # Anywhere in the line: a progress bar on stderr (no newline) may precede it.
            start = line.find('{"event": "listening"')
            if start >= 0:
                return json.loads(line[start:])["url"]
        return None

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "\n".join(self.output))
            try:
                conn = http.client.HTTPConnection(self.url.split("//")[1], timeout=2)
                conn.request("GET", "/ready")
                response = conn.getresponse()
                if response.status == 200:
                    return
                failed = {
                    name: status
                    for name, status in json.loads(response.read()).get("models", {}).items()
                    if status not in ("ready", "loading")
                }
                if failed:
                    raise RuntimeError(f"model failed to load: {failed}")
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready:\n" + "\n".join(self.output))

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the drain, SIGKILL if it does not end; returns the exit code."""
        return self.service.stop(timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_server(
    args: list[str], env: dict | None = None, module: str = "lmref.serve", timeout: float = 180.0
) -> ServerProcess:
    """Start ``python -m <module> <args>`` on a free port unless ``--port`` is given, wait for
    /ready, and return the handle; ``handle.stop()`` sends SIGTERM and waits."""
    if "--port" not in args:
        args = [*args, "--port", "0"]
    server = ServerProcess([sys.executable, "-m", module, *args], env, timeout)
    try:
        server.wait_ready(timeout)
    except Exception:
        server.stop()
        raise
    return server


# ----------------------------------------------------------------------------------- load generator
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def stream_completion(
    url: str,
    body: dict,
    api_key: str | None = None,
    timeout: float = 300.0,
    path: str = "/v1/completions",
) -> dict:
    """One streaming completions call over http.client, timed like vLLM's benchmark: time to
    first token, time per output token after the first, end-to-end. ``path``
    ``/v1/chat/completions`` for a ``messages`` body (its text comes as ``delta.content``)."""
    host = url.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    text, tokens = [], 0
    try:
        conn.request("POST", path, json.dumps(payload), headers)
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return {"ok": False, "status": response.status}
        for line in response:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                response.read()  # the end of the chunked body, so closing is not a disconnect
                break
            event = json.loads(data)
            if "error" in event:
                return {"ok": False, "status": 200, "error": event["error"]}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    finally:
        conn.close()
    end = time.perf_counter()
    first = first or end
    return {
        "ok": True,
        "text": "".join(text),
        "tokens": tokens,
        "ttft": first - start,
        "e2e": end - start,
        "tpot": (end - first) / (tokens - 1) if tokens > 1 else 0.0,
    }


def drain(jobs: list, clients: int, send: Callable[[Any], dict]) -> tuple[list[dict], float]:
    """A closed loop: ``clients`` threads take ``jobs`` in order, each once, and ``send`` each as
    soon as their previous one is answered. Returns the results (in completion order) and the
    wall seconds. ``send`` decides which errors count as a failed request instead of raising."""
    pending = collections.deque(jobs)
    lock = threading.Lock()
    results: list[dict] = []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                job = pending.popleft()
            result = send(job)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def latency_percentiles(ok: list[dict]) -> dict:
    """``ttft``/``tpot``/``e2e`` p50 and p99 in ms of the successful results of ``drain``."""
    summary = {}
    for name in ("ttft", "tpot", "e2e"):
        values = [r[name] * 1000 for r in ok]
        summary[f"{name}_p50_ms"] = _percentile(values, 0.5)
        summary[f"{name}_p99_ms"] = _percentile(values, 0.99)
    return summary


def run_load(
    url: str,
    prompts: list[str],
    concurrency: int,
    model: str | None = None,
    max_tokens: int = 32,
    api_key: str | None = None,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    chat: bool = False,
) -> dict:
    """A closed-loop load: ``concurrency`` clients send the prompts (each once) as fast as they
    are answered. Returns vLLM-benchmark-style numbers (requests/s, output tokens/s, TTFT, TPOT,
    end-to-end p50/p99 in ms) and the output lengths (``ignore_eos=False``: each answer's own,
    at most ``max_tokens``). ``chat``: each prompt is a user message, sent to the chat route."""
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def send(prompt: str) -> dict:
        body = {"max_tokens": max_tokens, "temperature": temperature, "ignore_eos": ignore_eos}
        body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        if model:
            body["model"] = model
        try:
            return stream_completion(url, body, api_key, path=path)
        except OSError as exc:
            return {"ok": False, "error": str(exc)}

    results, duration = drain(prompts, concurrency, send)
    ok = [r for r in results if r["ok"]]
    return {
        "concurrency": concurrency,
        "requests": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / duration,
        "output_tokens_min": min((r["tokens"] for r in ok), default=0),
        "output_tokens_max": max((r["tokens"] for r in ok), default=0),
        **latency_percentiles(ok),
    }


def load_curve(
    targets: dict[str, str],
    prompts: list[str],
    clients: list[int],
    repeats: int = 3,
    requests_per_client: int = 2,
    min_requests: int = 8,
    **load: Any,
) -> list[dict]:
    """``run_load`` for each number of ``clients`` against each of ``targets`` (a label -> a
    server URL), ``repeats`` times, the targets alternating inside each repeat (so a burst of
    load from other jobs hits both). Each run sends ``max(min_requests, requests_per_client *
    clients)`` prompts, taken in turn from ``prompts``. One row per run: ``target``, ``repeat``
    and ``run_load``'s numbers; ``load`` goes to ``run_load`` (``model``, ``max_tokens``,
    ``chat``, ``ignore_eos`` ...)."""
    rows = []
    for n in clients:
        count = max(min_requests, requests_per_client * n)
        jobs = [prompts[i % len(prompts)] for i in range(count)]
        for repeat in range(repeats):
            for label, url in targets.items():
                rows.append({"target": label, "repeat": repeat} | run_load(url, jobs, n, **load))
    return rows


def closed_loop(
    url: str,
    body: dict,
    clients: int,
    seconds: float,
    path: str = "/v1/completions",
    api_key: str | None = None,
    timeout: float = 60.0,
) -> list[dict]:
    """``clients`` threads send ``body`` (not streamed) back to back for ``seconds``. Returns
    every request: ``start`` and ``end`` (seconds from the start), ``status`` (the HTTP status,
    or the exception's name when no answer came) and ``upstream`` (nginx's X-Upstream)."""
    host = url.split("//", 1)[1]
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    payload = json.dumps(body)
    lock, results = threading.Lock(), []
    t0 = time.perf_counter()

    def client() -> None:
        while time.perf_counter() - t0 < seconds:
            start = time.perf_counter() - t0
            conn = http.client.HTTPConnection(host, timeout=timeout)
            try:
                conn.request("POST", path, payload, headers)
                response = conn.getresponse()
                response.read()
                status, upstream = response.status, response.getheader("X-Upstream", "")
            except (OSError, http.client.HTTPException) as exc:
                status, upstream = type(exc).__name__, ""
            finally:
                conn.close()
            with lock:
                results.append(
                    {
                        "start": start,
                        "end": time.perf_counter() - t0,
                        "status": status,
                        "upstream": upstream,
                    }
                )

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r["start"])


class MetricsRecorder:
    """Scrapes ``url + "/metrics"`` every ``every_s`` seconds in a thread; ``stop()`` returns the
    samples: ``{"t": seconds, name: value, ...}``, each value summed over the metric's labels."""

    def __init__(self, url: str, names: list[str], every_s: float = 0.25):
        self.url, self.names, self.every_s = url, names, every_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        host = self.url.split("//", 1)[1]
        while not self._stop.is_set():
            try:
                conn = http.client.HTTPConnection(host, timeout=5)
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
                conn.close()
            except (OSError, http.client.HTTPException):
                text = None
            if text is not None:
                sample = {"t": time.perf_counter() - self._t0}
                for line in text.splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name in self.names:
                        sample[name] = sample.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
                self.samples.append(sample)
            self._stop.wait(self.every_s)

    def elapsed(self) -> float:
        """Seconds since recording began: the time axis of the samples."""
        return time.perf_counter() - self._t0

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.samples
