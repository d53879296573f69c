"""Prometheus metrics of a model server, named like vLLM's (``vllm:`` -> ``lmref:``).

One ``EngineMetrics`` per server, in a registry of its own (so two servers in one process, as in
the tests, do not collide); every series is labelled with ``model_name``. Needs only
``prometheus_client``; ``lmref.serving.engine`` fills it, ``lmref.serving.app`` exposes it on ``/metrics``.
The registry also carries the process's own CPU and memory (``process_cpu_seconds_total``,
``process_resident_memory_bytes``, ...) and the Python version (``python_info``), as the default
registry would.

Usage::

    from prometheus_client import generate_latest
    from lmref.serving.metrics import EngineMetrics

    metrics = EngineMetrics()
    metrics.generation_tokens.labels(model_name="base").inc(16)
    print(generate_latest(metrics.registry).decode())
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.registry import REGISTRY


class EngineMetrics:
    """Prometheus metrics, named like vLLM's (``vllm:`` -> ``lmref:``), in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        # The default registry's process collectors, on this one: a registry of our own would
        # otherwise lose them. Read from /proc at each scrape (Linux; empty elsewhere).
        if r is not REGISTRY:  # the default registry has them already
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.e2e_latency = Histogram(
            "lmref:e2e_request_latency_seconds",
            "End-to-end latency",
            ["model_name"],
            buckets=latency,
            registry=r,
        )
        self.ttft = Histogram(
            "lmref:time_to_first_token_seconds",
            "Time to first token",
            ["model_name"],
            buckets=latency,
            registry=r,
        )
        self.itl = Histogram(
            "lmref:inter_token_latency_seconds",
            "Time between output tokens",
            ["model_name"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lmref:prompt_tokens", "Prompt tokens processed", ["model_name"], registry=r
        )
        self.generation_tokens = Counter(
            "lmref:generation_tokens", "Tokens generated", ["model_name"], registry=r
        )
        # Server-side failures of requests routed to a version (5xx, a full queue), by a short
        # reason: with request_success, a version's error rate (the canary's and alerts' input).
        self.request_errors = Counter(
            "lmref:request_errors",
            "Requests routed to a version that failed on the server side, by reason",
            ["model_name", "reason"],
            registry=r,
        )
        self.request_success = Counter(
            "lmref:request_success",
            "Finished sequences by reason",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.running = Gauge(
            "lmref:num_requests_running",
            "Sequences in the running batch",
            ["model_name"],
            registry=r,
        )
        self.waiting = Gauge(
            "lmref:num_requests_waiting",
            "Sequences waiting in the queue",
            ["model_name"],
            registry=r,
        )
        self.batch_size = Histogram(
            "lmref:batch_size",
            "Sequences per batched generation",
            ["model_name"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.cache_hits = Counter(
            "lmref:response_cache_hits",
            "Greedy responses served from cache",
            ["model_name"],
            registry=r,
        )
        self.cache_misses = Counter(
            "lmref:response_cache_misses",
            "Greedy requests not in cache",
            ["model_name"],
            registry=r,
        )
