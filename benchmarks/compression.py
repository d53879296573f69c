"""Compression benchmark: what int8 buys on CPU, and what 4/8-bit and 2:4 sparsity buy on a GPU.

CPU (no CUDA): int8 dynamic quantization (``lmref.compression.quantization.quantize_int8_dynamic``) against
fp32 on a model large enough for weight traffic to dominate decoding: the ``llama-1b`` preset's
layer shape (hidden 2048, MLP 5632, GQA 32/4 heads) with ``--layers`` decoder layers (default 2,
~100M parameters, 400 MB fp32) and the course vocabulary size (4096). Randomly initialised: on 2
CPU cores a model this size cannot be trained in the benchmark's time, so its perplexity change
only shows that nothing broke; the quality number that counts is the same quantization on the
trained course base model (``artifacts/base``, ``tiny`` preset), measured on the validation split
(``--base``; skipped when the folder is missing). Decode and prefill are timed in alternating
rounds, best of each, so that neighbours' load on a shared machine hits both variants alike.
If torchao is importable, its ``Int8DynamicActivationInt8WeightConfig`` is timed too (it is not a
project dependency: the record shows why ``lmref.compression`` does not use it on CPU).

GPU (CUDA present): the ~1.1B ``llama-1b`` shape (22 layers): weight memory of bf16 vs bitsandbytes
int8 and nf4, with decode tokens/s; and 2:4 semi-structured sparse matmuls
(``torch.sparse.to_sparse_semi_structured``, cuSPARSELt and CUTLASS backends) against dense bf16
on MLP shapes from 1.1B (5632x2048) to 7B-like (11008x4096, 16384x4096) at 4k and 16k tokens.

    python benchmarks/compression.py          # writes benchmarks/results/compression-<device>.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lmref.compression import load_bnb, measure, memory_bytes, quantize_int8_dynamic
from lmref.lab.course import ARTIFACTS
from lmref.models.presets import build_model

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{name}, {torch.get_num_threads()} torch threads, {__import__('os').cpu_count()} cores"


def timed_generate(model, prompts: torch.Tensor, new_tokens: int) -> float:
    gen = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)
    return time.perf_counter() - start


def timed_prefill(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids)
    return time.perf_counter() - start


def cpu_int8(args) -> dict:
    torch.manual_seed(0)
    model = build_model("llama-1b", vocab_size=4096, num_hidden_layers=args.layers).eval()
    variants = {"fp32": model, "int8-dynamic": quantize_int8_dynamic(model)}
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao_model = copy.deepcopy(model)
        quantize_(ao_model, Int8DynamicActivationInt8WeightConfig())
        variants[f"torchao-{torchao.__version__}-int8-dynamic"] = ao_model
    except ImportError:
        pass
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 4096, (1, args.prompt_tokens), generator=g)
    prefill_ids = torch.randint(0, 4096, (1, args.prefill_tokens), generator=g)
    eval_ids = torch.randint(0, 4096, (4, 128), generator=g)
    for v in variants.values():  # warm-up: first calls allocate and pack
        timed_generate(v, prompts, 2)
        timed_prefill(v, prefill_ids)
    decode = {k: float("inf") for k in variants}
    prefill = {k: float("inf") for k in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            decode[name] = min(decode[name], timed_generate(v, prompts, args.new_tokens))
            prefill[name] = min(prefill[name], timed_prefill(v, prefill_ids))
    rows = {}
    for name, v in variants.items():
        m = measure(v, eval_ids, name=name, batch_size=4, new_tokens=2, repeats=1)
        rows[name] = {
            "memory_mb": memory_bytes(v) / 2**20,
            "decode_tokens_per_s": args.new_tokens / decode[name],
            "prefill_tokens_per_s": args.prefill_tokens / prefill[name],
            "random_init_perplexity": m.perplexity,
        }
    base = rows["fp32"]
    for row in rows.values():
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["perplexity_change"] = (
            row["random_init_perplexity"] / base["random_init_perplexity"] - 1
        )
    return {
        "model": f"llama-1b preset shape, {args.layers} decoder layers, vocab 4096, random init",
        "parameters": sum(p.numel() for p in model.parameters()),
        "results": rows,
    }


def base_quality(base_dir: Path, max_batches: int) -> dict | None:
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    corpus = ARTIFACTS / "data" / "corpus"
    if not (base_dir / "model.safetensors").exists() or not corpus.exists():
        return None
    valid = load_from_disk(str(corpus))["validation"]
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    fp32 = measure(model, valid, "fp32", max_batches=max_batches, new_tokens=16)
    int8 = measure(
        quantize_int8_dynamic(model), valid, "int8-dynamic", max_batches=max_batches, new_tokens=16
    )
    return {
        "model": f"course base model ({base_dir.name}/, tiny preset, trained in notebook 02)",
        "eval_tokens": fp32.eval_tokens,
        "fp32": fp32.as_row(),
        "int8-dynamic": int8.as_row(),
        "perplexity_change": int8.perplexity / fp32.perplexity - 1,
        "decode_speedup": int8.decode_tokens_per_s / fp32.decode_tokens_per_s,
    }


def gpu_bnb(args) -> dict:
    """Weight memory and decode speed of the 1.1B shape in bf16, bnb int8 and nf4."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_model("llama-1b").to(torch.bfloat16).save_pretrained(tmp)
        ids = torch.randint(0, 32000, (4, 512))
        for mode in ("bf16", "int8", "nf4"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if mode == "bf16":
                from transformers import AutoModelForCausalLM

                model = (
                    AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda().eval()
                )
            else:
                model = load_bnb(tmp, mode, device="cuda")
            m = measure(model, ids, mode, batch_size=4, new_tokens=64)
            out[mode] = {
                "weight_memory_mb": memory_bytes(model) / 2**20,
                "peak_cuda_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "decode_tokens_per_s": m.decode_tokens_per_s,
                "prefill_tokens_per_s": m.prefill_tokens_per_s,
            }
            del model
    for row in out.values():
        row["memory_vs_bf16"] = row["weight_memory_mb"] / out["bf16"]["weight_memory_mb"]
    return out


def bench(x: torch.Tensor, w: torch.Tensor) -> float:
    """Median seconds of ``F.linear(x, w)`` (torch.utils.benchmark synchronizes CUDA)."""
    from torch.utils.benchmark import Timer

    timer = Timer("torch.nn.functional.linear(x, w)", globals={"x": x, "w": w, "torch": torch})
    return timer.blocked_autorange(min_run_time=0.5).median


def gpu_two_four(args) -> list[dict]:
    """2:4 sparse (cuSPARSELt, CUTLASS) vs dense bf16 ``F.linear`` on MLP weight shapes."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    shapes = [
        (5632, 2048),
        (2048, 5632),
        (11008, 4096),
        (4096, 11008),
        (16384, 4096),
        (4096, 16384),
    ]
    rows = []
    for out_f, in_f in shapes:
        weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(out_f, in_f // 4)
        weight = weight * mask
        for tokens in (4096, 16384):
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            row = {"weight": f"{out_f}x{in_f}", "tokens": tokens}

            row["dense_ms"] = bench(x, weight) * 1e3
            for backend, force_cutlass in (("cusparselt", False), ("cutlass", True)):
                SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
                try:
                    sparse = to_sparse_semi_structured(weight)
                    torch.testing.assert_close(
                        torch.nn.functional.linear(x[:64], sparse),
                        torch.nn.functional.linear(x[:64], weight),
                        rtol=2e-2,
                        atol=1.0,
                    )  # bf16 outputs ~50
                    row[f"{backend}_ms"] = bench(x, sparse) * 1e3
                    row[f"{backend}_speedup"] = row["dense_ms"] / row[f"{backend}_ms"]
                except (RuntimeError, NotImplementedError, AssertionError) as err:
                    row[f"{backend}_error"] = str(err).splitlines()[0][:200]
            rows.append(row)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the CPU model")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU torch threads (1: steady timings on a shared 2-core machine)",
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", type=Path, default=ARTIFACTS / "base")
    parser.add_argument("--base-batches", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    record = {
        "benchmark": "compression",
        "device": "cuda" if cuda else "cpu",
        "device_name": device_name(),
        "torch": torch.__version__,
        "settings": {k: v.name if isinstance(v, Path) else v for k, v in vars(args).items()},
        "targets": {
            "cpu_int8_decode_speedup_min": 1.5,
            "cpu_int8_perplexity_increase_max": 0.03,
            "gpu_2to4_cusparselt_speedup_7b_shapes_16k_min": 1.25,
        },
    }
    start = time.time()
    if cuda:
        record["bnb_llama_1b"] = gpu_bnb(args)
        record["semi_structured_2to4"] = gpu_two_four(args)
    else:
        record["gpu"] = (
            "no CUDA device on this run: the 1.1B nf4/int8 memory and the 2:4 "
            "cuSPARSELt/CUTLASS matmul parts run only when CUDA is present"
        )
        record["int8_dynamic_large"] = cpu_int8(args)
        record["int8_dynamic_base"] = base_quality(args.base, args.base_batches)
    record["seconds"] = time.time() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    # "NVIDIA H100 80GB HBM3" -> cuda-h100
    suffix = (
        "cuda-" + torch.cuda.get_device_name().removeprefix("NVIDIA ").split()[0].lower()
        if cuda
        else "cpu"
    )
    path = RESULTS / f"compression-{suffix}.json"
    path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
