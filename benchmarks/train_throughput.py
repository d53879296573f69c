"""Training throughput: the lmref loop vs Hugging Face Trainer, same model, data, batch, precision.

CPU (default here): the `tiny` preset, batch 16 x 256 tokens, fp32.
GPU: the `gpt2-124m` shape (HF GPT2LMHeadModel), batch 16 x 1024 tokens, bf16; the lmref loop
with torch.compile, HF Trainer with its bf16 defaults (the setting of the issue's H100 numbers).

Each variant runs in a fresh process, so peak memory is its own. Tokens/s counts input tokens
over the timed steps only (the first `--warmup` steps, compilation included, are not timed).
Data are random token blocks: throughput does not depend on content.

    python benchmarks/train_throughput.py                 # writes benchmarks/results/train_throughput-<device>.json
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


def settings(device: str) -> dict:
    if device == "cuda":
        return {
            "preset": "gpt2-124m",
            "batch": 16,
            "seq": 1024,
            "precision": "bf16",
            "steps": 60,
            "warmup": 15,
            "compile": True,
        }
    return {
        "preset": "tiny",
        "batch": 16,
        "seq": 256,
        "precision": "fp32",
        "steps": 30,
        "warmup": 5,
        "compile": False,
    }


def make_data(vocab: int, n: int, seq: int):
    import datasets

    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict(
        {"input_ids": torch.randint(0, vocab, (n, seq), generator=g).tolist()}
    )


def run_variant(variant: str, s: dict) -> dict:
    from lmref.core.device import default_device
    from lmref.core.memory import PeakMemory
    from lmref.models.presets import build_model
    from lmref.training.config import TrainingConfig
    from lmref.training.loop import train
    from lmref.training.metrics_log import device_peak_flops, flops_per_token

    device = default_device()
    model = build_model(s["preset"]).to(device)
    data = make_data(model.config.vocab_size, s["batch"] * (s["steps"] + 2), s["seq"])
    tokens_per_step = s["batch"] * s["seq"]
    out = tempfile.mkdtemp()
    step_times: list[float] = []
    with PeakMemory(device) as mem:
        if variant == "lmref":
            config = TrainingConfig(
                output_dir=out,
                max_steps=s["steps"],
                per_device_train_batch_size=s["batch"],
                learning_rate=3e-4,
                precision=s["precision"],
                torch_compile=s["compile"],
                logging_steps=10**9,
                disable_tqdm=True,
            )
            train(
                model,
                data,
                config,
                callbacks=[lambda step, m: step_times.append(_sync_time(device))],
            )
        else:
            from transformers import Trainer, TrainerCallback, TrainingArguments

            class Timer(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    step_times.append(_sync_time(device))

            args = TrainingArguments(
                output_dir=out,
                max_steps=s["steps"],
                per_device_train_batch_size=s["batch"],
                learning_rate=3e-4,
                bf16=s["precision"] == "bf16",
                report_to=[],
                save_strategy="no",
                logging_steps=10**9,
                disable_tqdm=True,
                use_cpu=device.type == "cpu",
            )

            def collate(rows):
                ids = torch.tensor([r["input_ids"] for r in rows])
                return {"input_ids": ids, "labels": ids}

            Trainer(
                model=model,
                args=args,
                train_dataset=data,
                data_collator=collate,
                callbacks=[Timer()],
            ).train()
    timed = step_times[s["warmup"] :]
    seconds = timed[-1] - timed[0]
    tokens_per_s = tokens_per_step * (len(timed) - 1) / seconds
    peak = device_peak_flops(device)
    return {
        "variant": variant,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * seconds / (len(timed) - 1),
        "mfu": tokens_per_s * flops_per_token(model, data) / peak if peak else None,
        "peak_memory_mb": mem.peak_mb,  # the peak during training (lmref.core.memory)
    }


def _sync_time(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant", choices=["lmref", "hf-trainer"], help="run one variant (internal)"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = settings(device)
    if args.variant:
        print(json.dumps(run_variant(args.variant, s)))
        return
    results = []
    for variant in ("lmref", "hf-trainer"):
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", variant],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1])
    name = (
        torch.cuda.get_device_name(0)
        if device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    report = {
        "benchmark": "train_throughput",
        "device": name,
        "torch": torch.__version__,
        "settings": s,
        "results": results,
        "lmref_vs_hf_trainer": results[0]["tokens_per_s"] / results[1]["tokens_per_s"],
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"train_throughput-{'cuda' if device == 'cuda' else 'cpu'}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
