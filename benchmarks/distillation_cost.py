"""What distillation costs per training step against plain cross-entropy training.

The student (half the width and depth of the course's fine-tuned model, notebook 08) trains on
instruction rows through ``lmref.training.loop.train`` three times for the same steps: with the
default loss; with ``lmref.training.distillation.distillation_loss`` (the teacher's forward pass
on every micro-batch, plus the KL at temperature T); and with ``cached_distillation_loss`` (the
teacher's top-k logits computed once, as notebook 08 does; the one-off cost is reported apart).
The on-the-fly difference per step is split into the teacher's forward pass and the loss itself
(timed alone on the same batches).

    python benchmarks/distillation_cost.py   # writes benchmarks/results/distillation_cost-<device>.json

On a CPU that other jobs share, run it with ``OMP_NUM_THREADS=1``: two-thread torch processes on
busy cores spend their time waiting on each other (the JSON records the thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmref.lab import course, distill_recipe
from lmref.lab.env import cpu_model
from lmref.models.loading import load_model
from lmref.models.presets import count_parameters
from lmref.training.distillation import (
    DistillationConfig,
    distillation_loss_sum,
    with_teacher_topk,
)
from lmref.training.loop import TrainingConfig

RESULTS = Path(__file__).resolve().parent / "results"


def seconds_per_step(
    rows, collator, teacher_dir, steps: int, batch: int, distill, teacher
) -> float:
    with tempfile.TemporaryDirectory() as out:
        config = TrainingConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=3e-3,
            logging_steps=steps,
            disable_tqdm=True,
        )
        run = distill_recipe.train_student(
            rows,
            collator,
            config,
            teacher_dir,
            rows.select(range(batch)),
            distill,
            teacher=teacher,
            curve_every=steps,
        )
    return run.curve[-1]["seconds"] / steps


@torch.no_grad()
def component_ms(teacher, student, batches, config: DistillationConfig) -> dict:
    def timed(fn) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        for b in batches:
            fn(b)
        return (time.perf_counter() - start) / len(batches) * 1e3

    logits = {}

    def teacher_forward(b=batches[0]):
        logits["t"] = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits["s"] = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits["labels"] = b["labels"]

    def student_forward(b=batches[0]):
        student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    t_ms = timed(teacher_forward) - timed(student_forward)
    kd_ms = timed(
        lambda b=None: distillation_loss_sum(logits["s"], logits["t"], logits["labels"], config)
    )
    ce_ms = timed(
        lambda b=None: F.cross_entropy(
            logits["s"].flatten(0, 1),
            F.pad(logits["labels"][:, 1:], (0, 1), value=-100).flatten(),
            ignore_index=-100,
            reduction="sum",
        )
    )
    return {"teacher_forward_ms": t_ms, "kd_loss_ms": kd_ms, "ce_loss_ms": ce_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1024, help="training rows (cached once)")
    parser.add_argument("--top-k", type=int, default=16, help="teacher logits cached per token")
    args = parser.parse_args()
    teacher_dir = course.ensure_full_ft()
    teacher = load_model(str(teacher_dir))
    student = distill_recipe.build_student(teacher_dir)
    distill = DistillationConfig(temperature=2.0, alpha=0.5)
    tokenized, collator = course.tokenized_instructions(str(teacher_dir))
    rows = tokenized["train"].select(range(args.rows))
    start = time.perf_counter()
    cached_rows = with_teacher_topk(teacher, rows, collator, k=args.top_k)
    cache_seconds = time.perf_counter() - start
    plain, kd, cached = [], [], []
    for _ in range(args.repeats):  # interleaved, so a busy neighbour hurts all alike
        args_ = (collator, teacher_dir, args.steps, args.batch)
        plain.append(seconds_per_step(rows, *args_, None, None))
        kd.append(seconds_per_step(rows, *args_, distill, teacher))
        cached.append(seconds_per_step(cached_rows, *args_, distill, None))
        print({"plain": plain[-1], "kd": kd[-1], "cached_kd": cached[-1]}, flush=True)
    batches = [
        collator([tokenized["train"][i] for i in range(s, s + args.batch)])
        for s in range(0, 10 * args.batch, args.batch)
    ]
    components = component_ms(teacher, student, batches, distill)
    report = {
        "benchmark": "distillation_cost",
        "device": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
        "steps": args.steps,
        "batch": args.batch,
        "distillation": vars(distill),
        "plain_s_per_step": plain,
        "kd_s_per_step": kd,
        "cached_kd_s_per_step": cached,
        "kd_cost_ratio": min(kd) / min(plain),
        "cached_kd_cost_ratio": min(cached) / min(plain),
        "top_k": args.top_k,
        "cache_rows": args.rows,
        "cache_seconds": cache_seconds,
        **components,
        "note": "ratios: min over interleaved repeats; other jobs may share the cores",
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"distillation_cost-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
