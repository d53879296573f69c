"""gRPC (KServe v2, tritonclient) against HTTP (OpenAI completions, requests) on one server.

One in-process server of SmolLM2-135M-Instruct (fp32, response cache off) serves both; the
same greedy prompt is sent one request at a time, HTTP and gRPC alternating, with
``max_tokens`` 1 (mostly transport, request shaping and one forward pass) and 16 (generation
dominates). Reported per transport and length: median latency and its range over the repeats,
and the difference of medians; the CPU model and the load average around the run (the cores
may be shared: compare numbers of one run only).

Usage::

    python benchmarks/grpc_overhead.py              # -> benchmarks/results/grpc_overhead-cpu.json
    python benchmarks/grpc_overhead.py --repeats 50 --model artifacts/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import requests  # noqa: E402
import tritonclient.grpc as triton  # noqa: E402

from lmref.lab.env import cpu_model  # noqa: E402
from lmref.serve import start_server  # noqa: E402
from lmref.serving.app import ModelSpec, ServingConfig  # noqa: E402

PROMPT = "Write one sentence about the sea."


def summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(REPO / "artifacts" / "smollm2-135m-instruct"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/grpc_overhead-cpu.json"))
    args = parser.parse_args()
    config = ServingConfig(
        models=[ModelSpec("m", args.model)],
        api_keys=[],
        cache_size=0,
        torch_threads=args.threads,
        grpc_port=0,
    )
    server = start_server(config)
    http = requests.Session()
    client = triton.InferenceServerClient(server.grpc_target)
    load_before = os.getloadavg()
    results = {}
    try:
        for max_tokens in (1, 16):
            text = triton.InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
            params = triton.InferInput("sampling_parameters", [1], "BYTES")
            # ignore_eos: every request generates exactly max_tokens (this prompt ends early
            # otherwise, and the 16-token case measured one token).
            settings = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            params.set_data_from_numpy(np.array([settings.encode()], dtype=object))
            body = {"model": "m", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
            body["ignore_eos"] = True
            usage = http.post(server.url + "/v1/completions", json=body, timeout=60).json()["usage"]
            assert usage["completion_tokens"] == max_tokens, usage
            times: dict[str, list[float]] = {"http": [], "grpc": []}
            for i in range(args.repeats + 2):  # the first two warm both paths up, not counted
                for kind in ("http", "grpc") if i % 2 == 0 else ("grpc", "http"):
                    start = time.perf_counter()
                    if kind == "http":
                        http.post(server.url + "/v1/completions", json=body, timeout=60).json()
                    else:
                        client.infer("m", [text, params]).as_numpy("text_output")
                    if i >= 2:
                        times[kind].append(time.perf_counter() - start)
            row = {k: summary(v) for k, v in times.items()}
            row["grpc_minus_http_median_ms"] = row["grpc"]["median_ms"] - row["http"]["median_ms"]
            results[f"max_tokens={max_tokens}"] = row
    finally:
        client.close()
        server.stop(drain_timeout=5)
    report = {
        "benchmark": "grpc_overhead",
        "cpu": cpu_model(),
        "torch_threads": args.threads,
        "model": Path(args.model).name,
        "repeats": args.repeats,
        "loadavg_before_after": [load_before[0], os.getloadavg()[0]],
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
