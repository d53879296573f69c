"""What distillation costs per training step against plain cross-entropy training.

The student (half the width and depth of the course's fine-tuned model, notebook 08) trains on
the instruction set through ``lmref.training.loop.train`` twice for the same steps: with the default
loss, and with ``lmref.training.distillation.distillation_loss`` (the teacher's forward pass on every
micro-batch, plus the KL at temperature T). The difference per step is split into the teacher's
forward pass and the loss itself (timed alone on the same batches).

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
from lmref.training.distillation import DistillationConfig, distillation_loss_sum
from lmref.training.loop import TrainingConfig

RESULTS = Path(__file__).resolve().parent / "results"


def seconds_per_step(teacher, teacher_dir, steps: int, batch: int, distill) -> float:
    with tempfile.TemporaryDirectory() as out:
        config = TrainingConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=3e-3,
            logging_steps=steps,
            disable_tqdm=True,
        )
        _, result = distill_recipe.train_student(teacher, teacher_dir, config, distill)
    return result.train_seconds / steps


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
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    teacher_dir = course.ensure_full_ft()
    teacher = load_model(str(teacher_dir))
    student = distill_recipe.build_student(teacher_dir)
    distill = DistillationConfig(temperature=2.0, alpha=0.5)
    plain, kd = [], []
    for _ in range(args.repeats):  # interleaved, so a busy neighbour hurts both alike
        plain.append(seconds_per_step(teacher, teacher_dir, args.steps, args.batch, None))
        kd.append(seconds_per_step(teacher, teacher_dir, args.steps, args.batch, distill))
        print({"plain_s_per_step": plain[-1], "kd_s_per_step": kd[-1]}, flush=True)
    tokenized, collator = course.tokenized_instructions(str(teacher_dir))
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
        "kd_cost_ratio": min(kd) / min(plain),
        **components,
        "note": "min over interleaved repeats; other jobs may share the cores",
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"distillation_cost-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
