"""lmref against `transformers serve --continuous-batching`: same model, prompts and client.

In one run, one server after the other (never both at once: they would share the cores), each
with 2 torch threads: ``python -m lmref.serve`` and ``transformers serve --continuous-batching``
(the ``bench`` extra: ``pip install -e .[bench]``) on SmolLM2-135M-Instruct in fp32 (or ``--dtype bfloat16``). The official
``openai`` client sends streaming chat requests (32 max tokens, temperature 0, the same prompts
for both; lmref's response cache off) from 1, 16, 32 and 64 concurrent clients in a closed loop.
Reported per server and client count: output tokens/s, TTFT and end-to-end p50/p99, and the
load average of the machine around it (2 shared cores: compare numbers of one run only).

Single-request decode is set against the memory-bandwidth bound: each new token reads every
weight once, so tokens/s <= read bandwidth / weight bytes; the bandwidth is measured here, in the
same run (a large fp32 tensor summed, best of several), and decode tokens/s is 1 / TPOT p50 of
the one-client run.

Usage::

    python benchmarks/serving_peer.py           # -> benchmarks/results/serving_peer-cpu.json
    python benchmarks/serving_peer.py --clients 1 16 --servers lmref
    python benchmarks/serving_peer.py --dtype bfloat16   # -> serving_peer-cpu-bf16.json
    git archive <commit> lmref | tar -x -C /tmp/before      # and that commit's lmref too:
    python benchmarks/serving_peer.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lmref.lab.env import cpu_model  # noqa: E402
from lmref.lab.loadtest import drain, latency_percentiles, spawn_server  # noqa: E402
from lmref.lab.services import free_port  # noqa: E402

TOPICS = (
    "a lighthouse keeper",
    "the first snow of winter",
    "a robot learning to paint",
    "a lost city under the sea",
    "two rival bakers",
    "a dragon who fears heights",
    "the last train at night",
    "a garden on Mars",
    "a clock that runs backwards",
    "an old map in the attic",
    "a cat who runs a library",
    "a storm at the harbour",
    "a violin found in the rain",
    "the quietest village",
    "a kite over the desert",
    "a letter never sent",
)


def prompts(n: int) -> list[list[dict]]:
    """Chat requests that ask for more than 32 tokens, so most run to max_tokens."""
    return [
        [
            {
                "role": "user",
                "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (story {i}).",
            }
        ]
        for i in range(n)
    ]


def read_bandwidth_gbs(threads: int, mib: int = 1024, repeats: int = 7) -> float:
    """Memory read bandwidth: the best of several sums over a tensor much larger than the cache."""
    torch.set_num_threads(threads)
    data = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def weight_bytes(path: str, dtype: torch.dtype) -> int:
    """Bytes of weights read per token when served in ``dtype``, from the safetensors headers (a
    tied output layer is the embedding matrix: stored, and read, once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                total += int(torch.Size(f.get_slice(name).get_shape()).numel())
    return total * dtype.itemsize


@torch.inference_mode()
def decode_profile(
    path: str,
    threads: int,
    dtype: torch.dtype,
    packed: bool,
    batch_sizes: tuple[int, ...] = (1, 16, 32, 64),
    steps: int = 6,
) -> list[dict]:
    """Where a decode step's time goes, in this process (no server): the engine's step
    (lmref.serving.batching) at each batch size against the model's linear layers alone on the same
    shapes (the weight-reading matmuls; the rest is attention, norms, Python). ``packed``: the
    weights packed for oneDNN as the engine does by default (lmref.serving.packed_linear)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmref.serving.batching import Prefill, RunningBatch
    from lmref.serving.packed_linear import PackedLinear, pack_linears

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if packed:
        pack_linears(model)
    tok = AutoTokenizer.from_pretrained(path)
    encoded = [tok.apply_chat_template(m, add_generation_prompt=True) for m in prompts(64)]
    encoded = [e if isinstance(e, list) else e["input_ids"] for e in encoded]
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    linear_bytes = sum(m.in_features * m.out_features for m in linears) * dtype.itemsize
    out = []
    for b in batch_sizes:
        prefill = Prefill(model, encoded[:b], tok.pad_token_id or 0)
        logits = prefill.step()
        batch = RunningBatch(model)
        batch.join(prefill)
        tokens = logits.argmax(-1).tolist()
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            tokens = batch.step(tokens).argmax(-1).tolist()
            times.append(time.perf_counter() - start)
        xs = [torch.randn(b, 1, m.in_features, dtype=dtype) for m in linears]
        start = time.perf_counter()
        for _ in range(3):
            for m, x in zip(linears, xs):
                m(x)
        linear_s = (time.perf_counter() - start) / 3
        step_s = sorted(times[2:])[len(times[2:]) // 2]
        out.append(
            {
                "packed": packed,
                "batch": b,
                "step_ms_median": step_s * 1000,
                "linears_alone_ms": linear_s * 1000,
                "linears_share": linear_s / step_s,
                "linear_weight_read_gb_s": linear_bytes / linear_s / 1e9,
                "tokens_per_s": b / step_s,
                "loadavg": os.getloadavg(),
            }
        )
        print("profile", out[-1], flush=True)
    return out


# ------------------------------------------------------------------------------------ the client
def chat_once(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streaming chat request with the official client: TTFT, end-to-end, tokens, TPOT."""
    start = time.perf_counter()
    first, tokens, text = None, 0, []
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                first = first or time.perf_counter()
                text.append(choice.delta.content)
    end = time.perf_counter()
    first = first or end
    return {
        "ok": True,
        "tokens": tokens,
        "text": "".join(text),
        "ttft": first - start,
        "e2e": end - start,
        "tpot": (end - first) / (tokens - 1) if tokens > 1 else 0.0,
    }


def run_chat_load(
    url: str, model: str, requests: list[list[dict]], clients: int, max_tokens: int
) -> dict:
    """A closed loop: ``clients`` threads send the requests (each once) as fast as answered."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def send(job: tuple[int, list[dict]]) -> dict:
        index, messages = job
        try:
            result = chat_once(client, model, messages, max_tokens)
        except Exception as exc:  # a failed request is counted, not fatal
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {**result, "index": index}

    load_before = os.getloadavg()
    results, duration = drain(list(enumerate(requests)), clients, send)
    ok = [r for r in results if r["ok"]]
    summary = {
        "clients": clients,
        "requests": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:3],
        "duration_s": duration,
        "output_tokens": sum(r["tokens"] for r in ok),
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / duration,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        **latency_percentiles(ok),
    }
    summary["texts"] = {r["index"]: r["text"] for r in ok}
    return summary


# ----------------------------------------------------------------------------------- the servers
class TransformersServe:
    """``transformers serve <folder> --continuous-batching`` in a child process, pinned to the
    model, on CPU in the given dtype; ready when ``/health`` answers."""

    def __init__(
        self,
        model_path: str,
        threads: int,
        dtype: str,
        timeout: float = 300.0,
        env: dict | None = None,
    ):
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model_path
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "transformers_serve.log", "w")
        self.proc = subprocess.Popen(
            [
                exe,
                "serve",
                model_path,
                "--continuous-batching",
                "--device",
                "cpu",
                "--dtype",
                dtype,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"transformers serve did not start; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start(
    server: str,
    model_path: str,
    threads: int,
    max_batch: int,
    dtype: str,
    before: str | None = None,
):
    """(handle with .url and .stop(), the model name requests use). "lmref-before": the lmref
    package found under ``before`` (an older checkout), same flags; "lmref-unpacked": lmref with
    ``--no-pack-linears`` (MKL's GEMM on the weights as loaded)."""
    # "-passive": idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) instead of libgomp's
    # default of spinning a while first; lmref.serve's comment has the numbers.
    passive = {"OMP_WAIT_POLICY": "PASSIVE"} if server.endswith("-passive") else {}
    if server.startswith("lmref"):
        path_env = {"PYTHONPATH": before} if server == "lmref-before" else {}
        unpacked = ["--no-pack-linears"] if server == "lmref-unpacked" else []
        handle = spawn_server(
            [
                "--model",
                f"smollm2={model_path}",
                "--torch-threads",
                str(threads),
                "--cache-size",
                "0",
                "--max-batch-size",
                str(max_batch),
                "--threads",
                "160",
                "--max-queue-size",
                "1024",
                "--dtype",
                dtype,
                *unpacked,
            ],
            env={"LMREF_API_KEYS": "", "OMP_NUM_THREADS": str(threads), **path_env, **passive},
        )
        return handle, "smollm2"
    handle = TransformersServe(model_path, threads, dtype, env=passive)
    return handle, handle.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "artifacts" / "smollm2-135m-instruct"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["lmref", "lmref-unpacked", "transformers-serve-cb"],
        help="also: lmref-passive, transformers-serve-cb-passive (idle OpenMP "
        "threads asleep: OMP_WAIT_POLICY=PASSIVE), lmref-before",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights and compute of both servers (bfloat16 pays on CPUs with AVX512-BF16 or AMX)",
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64, help="lmref's")
    parser.add_argument(
        "--before",
        default=None,
        metavar="FOLDER",
        help="also run the lmref package under FOLDER (e.g. `git archive` of an "
        "older commit) as server lmref-before",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the in-process profile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.before:
        args.servers = [*args.servers, "lmref-before"]
    if not Path(args.model, "config.json").exists():
        sys.exit(
            f"--model {args.model}: no Hugging Face folder there (config.json missing); "
            "build it with `python -m lmref.lab.course` or `make artifacts`"
        )

    bandwidth = read_bandwidth_gbs(args.torch_threads)
    dtype = getattr(torch, args.dtype)
    weights = weight_bytes(args.model, dtype)
    bound = bandwidth * 1e9 / weights
    print(
        f"read bandwidth {bandwidth:.1f} GB/s, weights {weights / 1e6:.0f} MB -> "
        f"decode bound {bound:.1f} tokens/s",
        flush=True,
    )
    profile = (
        []
        if args.no_profile
        else [
            row
            for packed in (False, True)
            for row in decode_profile(args.model, args.torch_threads, dtype, packed)
        ]
    )
    runs: dict[str, list[dict]] = {}
    for server in args.servers:
        handle, model = start(
            server, args.model, args.torch_threads, args.max_batch_size, args.dtype, args.before
        )
        try:
            run_chat_load(handle.url, model, prompts(4), 2, 8)  # warm-up: first calls allocate
            runs[server] = []
            for clients in args.clients:
                n = max(args.min_requests, clients * args.requests_per_client)
                r = run_chat_load(handle.url, model, prompts(n), clients, args.max_tokens)
                r["server"] = server
                r["omp_wait_policy"] = (
                    "PASSIVE"
                    if server.endswith("-passive")
                    else os.environ.get("OMP_WAIT_POLICY", "libgomp default (spin, then sleep)")
                )
                runs[server].append(r)
                print(
                    f"{server:22s} clients={clients:3d} tok/s={r['output_tokens_per_s']:7.1f} "
                    f"ttft p50/p99={r['ttft_p50_ms']:7.0f}/{r['ttft_p99_ms']:7.0f}ms "
                    f"e2e p50/p99={r['e2e_p50_ms']:7.0f}/{r['e2e_p99_ms']:7.0f}ms "
                    f"tpot p50={r['tpot_p50_ms']:6.1f}ms failed={r['failed']} "
                    f"load={r['loadavg_before'][0]:.2f}",
                    flush=True,
                )
        finally:
            handle.stop()

    def at(server: str, clients: int) -> dict | None:
        return next((r for r in runs.get(server, []) if r["clients"] == clients), None)

    # Greedy answers of the two servers, request by request (same prompts, same weights).
    same = None
    if at("lmref", 1) and at("transformers-serve-cb", 1):
        a, b = at("lmref", 1)["texts"], at("transformers-serve-cb", 1)["texts"]
        same = sum(a[i] == b.get(i) for i in a) / max(1, len(a))
    ratios, single, ratios_passive = {}, {}, {}
    for clients in args.clients:
        mine = at("lmref", clients)
        for peer_name, table in (
            ("transformers-serve-cb", ratios),
            ("transformers-serve-cb-passive", ratios_passive),
        ):
            peer = at(peer_name, clients)
            if mine and peer:
                table[str(clients)] = mine["output_tokens_per_s"] / peer["output_tokens_per_s"]
    for server in runs:
        one = at(server, 1)
        if one and one["tpot_p50_ms"] > 0:
            rate = 1000 / one["tpot_p50_ms"]
            single[server] = {"decode_tokens_per_s": rate, "fraction_of_bound": rate / bound}
    for server_runs in runs.values():
        for r in server_runs:
            r.pop("texts")
    report = {
        "benchmark": "serving_peer",
        "device": "cpu",
        "device_name": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "note": "2 CPU cores shared with other agents' jobs: timings are noisy; loadavg_* is "
        "os.getloadavg() before/after each measurement; compare within one run only",
        "settings": {
            "model": Path(args.model).name,
            "dtype": args.dtype,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "client": "openai " + __import__("openai").__version__,
            "torch_threads": args.torch_threads,
            "lmref_response_cache": "off",
            "lmref_max_batch_size": args.max_batch_size,
            "requests": f"max({args.min_requests}, {args.requests_per_client} x clients)",
            "servers_run": "one after the other",
        },
        "bandwidth_bound": {
            "read_bandwidth_gb_s": bandwidth,
            "weight_bytes": weights,
            "decode_bound_tokens_per_s": bound,
            "method": "best of 7 sums over a 1 GiB fp32 tensor, same threads",
        },
        "single_request_decode": single,
        "decode_step_profile": profile,
        "results": [r for server_runs in runs.values() for r in server_runs],
        "lmref_vs_transformers_serve_cb_tokens_per_s": ratios,
        "lmref_vs_transformers_serve_cb_passive_tokens_per_s": ratios_passive,
        "greedy_answers_equal_fraction": same,
        "targets": {
            "tokens_per_s_ratio_at_16_and_32": 1.5,
            "met_throughput": all(ratios.get(c, 0) >= 1.5 for c in ("16", "32")),
            "single_request_fraction_of_bound": 0.5,
            "met_single": single.get("lmref", {}).get("fraction_of_bound", 0) >= 0.5,
        },
    }
    suffix = "" if args.dtype == "float32" else "-bf16"
    out = Path(args.out or REPO / "benchmarks" / "results" / f"serving_peer-cpu{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "single": single, "targets": report["targets"]}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
