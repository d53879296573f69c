"""Fine-tuning memory and speed: full vs LoRA vs QLoRA, each with and without gradient checkpointing.

CPU (default here): the `tiny` preset (Llama-shaped, 2.4M parameters), batch 8 x 256 tokens, fp32.
GPU: the ~1.1B Llama shape (`llama-1b`: hidden 2048, 22 layers, GQA 32/4, vocab 32000), batch 4 x
1024 tokens, bf16 autocast. Every variant trains through `lmref.training.loop.train`.

What each method holds in memory (the point of the comparison):
- full: fp32 master weights + fp32 gradients + two AdamW moments = 16 bytes/parameter, plus
  activations;
- LoRA (r=16, all linear layers, dropout 0): the frozen base in the compute dtype (bf16 on GPU:
  2 bytes/parameter, no gradient, no optimizer state), 16 bytes only for the adapter; frozen
  weights also need no weight-gradient matmul, a third of the backward FLOPs;
- QLoRA: the frozen linear layers in nf4 (~0.5 byte/parameter), dequantised on the fly;
- gradient checkpointing keeps one activation per layer and recomputes the rest in backward.

Each variant runs in a fresh process. Memory is one measurement, ``lmref.core.memory.PeakMemory``
around the ``train()`` call (the same one the trainer reports as ``TrainResult.peak_memory_mb``):
``peak_memory_mb`` is the peak during training (CUDA: allocated by torch; CPU: resident, Python
and torch included) and ``train_added_mb`` that peak above the memory in use when training
started (the loaded model), which isolates what the method itself costs. Tokens/s counts input
tokens over the timed steps (the first ``warmup`` steps are not timed). Data are random token
blocks: speed and memory do not depend on content.

    python benchmarks/finetune_memory.py       # writes benchmarks/results/finetune_memory-<device>.json
    python benchmarks/finetune_memory.py --compile   # GPU: also torch.compile variants
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("full", "lora", "qlora")


def settings(device: str) -> dict:
    if device == "cuda":
        return {
            "preset": "llama-1b",
            "batch": 4,
            "seq": 1024,
            "precision": "bf16",
            "steps": 20,
            "warmup": 5,
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "lora_targets": "all-linear",
        }
    return {
        "preset": "tiny",
        "batch": 8,
        "seq": 256,
        "precision": "fp32",
        "steps": 7,
        "warmup": 2,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_targets": "all-linear",
    }


def save_base(s: dict, out_dir: Path, device: str) -> None:
    """A random-init base saved as an HF folder, so QLoRA can quantise it while loading."""
    from lmref.models.presets import build_model

    model = build_model(s["preset"])
    if device == "cuda":
        model = model.to(torch.bfloat16)  # what a downloaded checkpoint would hold
    model.save_pretrained(out_dir)


def run_variant(method: str, checkpointing: bool, compile_: bool, s: dict, base_dir: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM

    from lmref.core.device import compute_dtype, default_device
    from lmref.core.memory import PeakMemory
    from lmref.training.config import TrainingConfig
    from lmref.training.loop import train
    from lmref.training.lora import LoraSettings, add_lora, load_qlora, trainable_report

    device = default_device()
    lora = LoraSettings(
        r=s["lora_r"],
        alpha=s["lora_alpha"],
        dropout=s["lora_dropout"],
        target_modules=s["lora_targets"],
    )
    if method == "qlora":
        model = load_qlora(base_dir, lora, device=device)
    else:
        # Full fine-tuning keeps fp32 master weights (autocast computes in bf16); a frozen LoRA
        # base needs no master copy, so it stays in the compute dtype.
        dtype = torch.float32 if method == "full" else compute_dtype(device)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
        if method == "lora":
            model = add_lora(model, lora)
    report = trainable_report(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    data = datasets.Dataset.from_dict(
        {
            "input_ids": torch.randint(
                0, vocab, (s["batch"] * (s["steps"] + 2), s["seq"]), generator=g
            ).tolist()
        }
    )
    step_times: list[float] = []
    config = TrainingConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=s["steps"],
        per_device_train_batch_size=s["batch"],
        learning_rate=1e-4,
        precision=s["precision"],
        gradient_checkpointing=checkpointing,
        torch_compile=compile_,
        logging_steps=10**9,
        disable_tqdm=True,
    )
    with PeakMemory(device) as mem:
        train(
            model, data, config, callbacks=[lambda step, m: step_times.append(_sync_time(device))]
        )
    timed = step_times[s["warmup"] :]
    seconds = timed[-1] - timed[0]
    tokens_per_s = s["batch"] * s["seq"] * (len(timed) - 1) / seconds
    return {
        "method": method,
        "gradient_checkpointing": checkpointing,
        "torch_compile": compile_,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * seconds / (len(timed) - 1),
        "peak_memory_mb": mem.peak_mb,
        "train_added_mb": mem.added_mb,
        "trainable_parameters": report["trainable_parameters"],
        "parameters": report["parameters"],
        "trainable_share": report["trainable_share"],
        "base_in_4bit": report["base_in_4bit"],
    }


def _sync_time(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--one",
        nargs=3,
        metavar=("METHOD", "CHECKPOINTING", "BASE_DIR"),
        help="run one variant in this process (internal)",
    )
    parser.add_argument("--compile", action="store_true", help="also run torch.compile variants")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = settings(device)
    if args.one:
        method, checkpointing, base_dir = args.one
        print(json.dumps(run_variant(method, checkpointing == "1", args.compile, s, base_dir)))
        return
    results = []
    with tempfile.TemporaryDirectory() as base_dir:
        save_base(s, Path(base_dir), device)
        variants = [(m, gc, False) for m in METHODS for gc in (False, True)]
        if args.compile:
            variants += [(m, False, True) for m in ("full", "lora")]
        for method, checkpointing, compile_ in variants:
            cmd = [sys.executable, __file__, "--one", method, str(int(checkpointing)), base_dir]
            proc = subprocess.run(
                cmd + (["--compile"] if compile_ else []), capture_output=True, text=True
            )
            if proc.returncode != 0:
                results.append(
                    {
                        "method": method,
                        "gradient_checkpointing": checkpointing,
                        "torch_compile": compile_,
                        "error": proc.stderr.strip()[-2000:],
                    }
                )
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    ok = {
        (r["method"], r["gradient_checkpointing"]): r
        for r in results
        if "error" not in r and not r["torch_compile"]
    }
    ratios = {}
    if ("full", False) in ok and ("lora", False) in ok:
        ratios["lora_vs_full_tokens_per_s"] = (
            ok["lora", False]["tokens_per_s"] / ok["full", False]["tokens_per_s"]
        )
        ratios["lora_vs_full_peak_memory"] = (
            ok["lora", False]["peak_memory_mb"] / ok["full", False]["peak_memory_mb"]
        )
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        note = (
            "GPU run: peak_memory_mb = lmref.core.memory.PeakMemory around train() "
            "(torch.cuda.max_memory_allocated, reset at its start)"
        )
    else:
        name = (
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
        note = (
            "No GPU was lent for this run: CPU only. The GPU settings (llama-1b, batch 4 x 1024, "
            "bf16) are in settings() and are selected when CUDA is present. CPU peak memory is "
            "lmref.core.memory.PeakMemory's resident high-water mark during train(), dominated "
            "by Python + torch (~0.4-0.5 GB) at this model size; train_added_mb isolates what "
            "training added. 2 CPU cores shared with other jobs: timings are noisy."
        )
    report = {
        "benchmark": "finetune_memory",
        "device": name,
        "gpu_lent": device == "cuda",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "note": note,
        "settings": s,
        "results": results,
        **ratios,
    }
    try:
        import bitsandbytes
        import peft

        report["versions"] = {"peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
    except ImportError:
        pass
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"finetune_memory-{device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
