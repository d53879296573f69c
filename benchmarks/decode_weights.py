"""What smaller decode weights cost and buy: fp32 (oneDNN-packed) against fp16 and int8 ones.

lmref's decode step for Llama models (``lmref.serving.fused_llama``) can read its weights as
stored (fp32 here), or as fp16, int8 weight-only (fp32 or bf16 activations), or int8 with
dynamically quantized activations (``--decode-weights``; ``SmallLinear`` says what each is). For each, on
SmolLM2-135M-Instruct and the course's held-out text (``artifacts/data/corpus``, the test
split's blocks), in one process:

- perplexity of the decode path itself: each document teacher-forced through ``SlotBatch``
  a token at a time, 16 documents decoding together, the first 128 tokens of each;
- greedy agreement with fp32 on the serving benchmark's chat prompts (32 tokens each);
- decode step time at 1, 16 and 64 rows (median of 10 steps; every kind timed in turn, three
  rounds, the median round: the VM's bandwidth drifts) and the weight bytes it reads.

Usage::

    python benchmarks/decode_weights.py     # -> benchmarks/results/decode_weights-cpu-<isa>.json
    python benchmarks/decode_weights.py --weights same int8 --out /tmp/dw.json   # some kinds

``<isa>`` is ``amx`` on the Intel Xeon, ``avx512`` where the CPU has AVX-512 without AMX (VNNI
and BF16 come with it on the machines here) and ``avx2`` elsewhere
(``benchmarks.peer_servers.cpu_isa``): the int8 kernels differ most between them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.peer_servers import cpu_isa, isa_flags  # noqa: E402
from benchmarks.serving_peer import prompts  # noqa: E402
from lmref.lab.env import cpu_model  # noqa: E402
from lmref.serving.batching import Prefill  # noqa: E402
from lmref.serving.fused_llama import DECODE_WEIGHTS, output_layer_weights  # noqa: E402
from lmref.serving.loader import load_served_model  # noqa: E402
from lmref.serving.slot_batch import SlotBatch  # noqa: E402

MODEL = str(REPO / "artifacts" / "smollm2-135m-instruct")
BATCHES = (1, 16, 64)  # rows decoding together when the step is timed
ROUNDS = 3
BYTES_PER_PARAMETER = {"same": 4, "fp16": 2}  # the int8 kinds: 1


def held_out(tokenizer, documents: int = 16, tokens: int = 128) -> list[list[int]]:
    """The first ``tokens`` SmolLM2 tokens of the first test blocks (the course's own
    tokenizer wrote them: decoded back to text first) that have that many."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from lmref.lab.course import ensure_data

    data = ensure_data()  # notebook 01's data, built here on a machine that has not run it
    course = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    out = []
    for block in load_from_disk(str(data / "corpus"))["test"]["input_ids"]:
        ids = tokenizer(course.decode(block))["input_ids"]
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == documents:
            return out
    raise SystemExit(f"{data / 'corpus'}: fewer than {documents} test documents of {tokens} tokens")


def decode_perplexity(served, documents: list[list[int]]) -> float:
    """exp(mean NLL) of every token after the first, each predicted by a decode step."""
    prefill = Prefill(served.model, [d[:1] for d in documents], served.pad_id)
    logits = prefill.step()
    batch = SlotBatch(served.model, served.fused)
    batch.join(prefill)
    nll, count = 0.0, 0
    for t in range(1, len(documents[0])):
        target = torch.tensor([d[t] for d in documents])
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
        count += len(documents)
        if t + 1 < len(documents[0]):
            logits = batch.step(target.tolist())
    return math.exp(nll / count)


def greedy(served, encoded: list[list[int]], steps: int = 32) -> list[list[int]]:
    prefill = Prefill(served.model, encoded, served.pad_id)
    logits = prefill.step()
    batch = SlotBatch(served.model, served.fused)
    batch.join(prefill)
    tokens = logits.argmax(-1).tolist()
    out = [[t] for t in tokens]
    for _ in range(steps - 1):
        tokens = batch.step(tokens).argmax(-1).tolist()
        for row, t in zip(out, tokens):
            row.append(t)
    return out


def step_ms(served, encoded: list[list[int]], steps: int = 10) -> float:
    prefill = Prefill(served.model, encoded, served.pad_id)
    tokens = prefill.step().argmax(-1).tolist()
    batch = SlotBatch(served.model, served.fused)
    batch.join(prefill)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        tokens = batch.step(tokens).argmax(-1).tolist()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", nargs="+", choices=DECODE_WEIGHTS, default=DECODE_WEIGHTS,
                        help="the kinds to measure (fp32, 'same', always comes first)")  # fmt: skip
    parser.add_argument("--out", help="default benchmarks/results/decode_weights-cpu-<isa>.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows, loaded = {}, {}
    reference = None
    for weights in ["same", *(w for w in args.weights if w != "same")]:
        served = load_served_model(MODEL, pack=True, decode_weights=weights)
        tok = served.tokenizer
        chats = [tok.apply_chat_template(m, add_generation_prompt=True) for m in prompts(16)]
        chats = [c if isinstance(c, list) else c["input_ids"] for c in chats]
        texts = greedy(served, chats)
        reference = reference or texts
        row = {
            "decode_weights": weights,
            "bytes_per_parameter": BYTES_PER_PARAMETER.get(weights, 1),
            "output_layer_bytes_per_parameter": BYTES_PER_PARAMETER.get(
                output_layer_weights(weights), 1
            ),
            "perplexity_held_out": decode_perplexity(served, held_out(tok)),
            "greedy_equal_to_fp32": sum(a == b for a, b in zip(texts, reference)),
            "greedy_compared": len(texts),
            "alone_vs_in_batch_equal": None,
            "step_ms_rounds": {str(n): [] for n in BATCHES},  # filled below, kinds in turn
        }
        # The same prompt alone and among 15 others: equal unless the batch changes its numbers.
        alone = [greedy(served, [c])[0] for c in chats[:4]]
        row["alone_vs_in_batch_equal"] = sum(a == b for a, b in zip(alone, texts[:4]))
        rows[weights], loaded[weights] = row, (served, chats)
        print(json.dumps(row), flush=True)
    # Step times last, every kind in each round: this VM's memory bandwidth drifts within
    # minutes (a one-row fp32 step took 14 ms in one minute and 20-28 in another), so kinds
    # timed in turn, round after round, meet the same drift; the median round is reported.
    for _ in range(ROUNDS):
        for weights, (served, chats) in loaded.items():
            for n in BATCHES:
                rows[weights]["step_ms_rounds"][str(n)].append(step_ms(served, (chats * 4)[:n]))
    for row in rows.values():
        row["step_ms"] = {n: statistics.median(t) for n, t in row["step_ms_rounds"].items()}
        row["tokens_per_s"] = {n: int(n) * 1000 / ms for n, ms in row["step_ms"].items()}
        row["loadavg"] = os.getloadavg()
        print(row["decode_weights"], {n: round(t) for n, t in row["tokens_per_s"].items()})
    base = rows["same"]["perplexity_held_out"]
    for row in rows.values():
        row["perplexity_vs_fp32"] = row["perplexity_held_out"] / base - 1
    report = {
        "benchmark": "decode_weights",
        "device": "cpu",
        "device_name": f"{cpu_model()}, {os.cpu_count()} cores",
        "isa": cpu_isa(),
        "avx512_flags": isa_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {
            "model": Path(MODEL).name,
            "threads": 2,
            "perplexity": "16 test documents x first 128 tokens, decoded together",
            "greedy": "16 chat prompts, 32 tokens, decoded together",
            "alone_vs_in_batch": "4 of the prompts alone against the same in the batch of 16",
            "step_ms": f"median of 10 steps, then the median of {ROUNDS} rounds, each round "
            "timing every kind in turn",
        },
        "results": rows,
    }
    out = Path(
        args.out or REPO / "benchmarks" / "results" / f"decode_weights-cpu-{report['isa']}.json"
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
