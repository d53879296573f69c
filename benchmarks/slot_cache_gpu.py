"""The slot KV cache and fused decode step (``lmref.serving.slot_batch``, ``.fused_llama``) on a GPU,
against the generic batch (transformers' forward). CI has no GPU, so this is run by hand where
one is lent:

1. the CPU unit tests of joins, leaves and growth (``tests/test_slot_batch.py``), called on a
   tiny random Llama on the GPU in fp32: logits equal to 1e-4;
2. greedy agreement of the two paths in bf16 (8 rows, 25 tokens each);
3. the time of one decode step of a random Llama shaped as SmolLM2-135M (30 layers, 576 wide) at
   1, 16 and 64 rows, bf16 and fp32, both paths (after 5 warm-up steps, mean of 40).

    python benchmarks/slot_cache_gpu.py          # writes results/slot_cache-cuda.json
    python benchmarks/slot_cache_gpu.py cpu      # the same on the CPU (part 3 takes minutes)

Needs only torch and transformers beside the repository (the device image's own versions)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the unit tests are imported from tests/

from lmref.serving.batching import Prefill, RunningBatch  # noqa: E402
from lmref.serving.fused_llama import FusedLlama  # noqa: E402
from lmref.serving.slot_batch import SlotBatch  # noqa: E402

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)


def random_llama(shape: dict, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shape)).to(device, dtype).eval()


def prefill(model, prompts: list[list[int]]):
    p = Prefill(model, prompts, pad_id=0, chunk_tokens=64, prefix=None)
    while (logits := p.step()) is None:
        pass
    return p, logits


@torch.inference_mode()
def greedy(model, batch, prompts: list[list[int]], steps: int = 24) -> list[list[int]]:
    """Each row fed its own argmax: the tokens of every step."""
    p, logits = prefill(model, prompts)
    batch.join(p)
    tokens = logits.argmax(-1).tolist()
    seen = [tokens]
    for _ in range(steps):
        tokens = batch.step(tokens).argmax(-1).tolist()
        seen.append(tokens)
    return seen


@torch.inference_mode()
def step_ms(model, batch, rows: int, device: str, steps: int = 40) -> float:
    """Mean time of one decode step of ``rows`` rows, after 5 warm-up steps."""
    p, logits = prefill(model, [[5 + i % 50] * 32 for i in range(rows)])
    batch.join(p)
    tokens = logits.argmax(-1).tolist()
    for _ in range(5):
        tokens = batch.step(tokens).argmax(-1).tolist()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):  # .tolist() waits for the step, as the engine does
        tokens = batch.step(tokens).argmax(-1).tolist()
    return round((time.perf_counter() - start) / steps * 1e3, 3)


def main() -> None:
    import tests.test_slot_batch as unit

    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    out: dict = {
        "device": device,
        "torch": torch.__version__,
        "name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    # 1. the unit tests' joins, leaves and growth, on this device (they assert)
    unit.test_slot_batch_gives_the_generic_batch_logits_through_joins_leaves_and_growth(
        random_llama(TINY, device, torch.float32)
    )
    unit.test_leave_moves_only_rows_past_the_new_end(random_llama(TINY, device, torch.float32))
    out["fp32_joins_leaves_growth"] = "logits equal to 1e-4"
    # 2. bf16 greedy agreement
    m = random_llama(TINY, device, torch.bfloat16)
    prompts = [[5 + i, 6, 7 + i][: 1 + i % 3] for i in range(8)]
    a = greedy(m, RunningBatch(m), prompts)
    b = greedy(m, SlotBatch(m, FusedLlama.of(m)), prompts)
    same = sum(x == y for r, s in zip(a, b) for x, y in zip(r, s))
    out["bf16_greedy_tokens_equal"] = f"{same}/{len(a) * len(prompts)}"
    # 3. step time, SmolLM2-135M's shape
    times = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = random_llama(SMOLLM2, device, dtype)
        fused = FusedLlama.of(model)
        for rows in (1, 16, 64):
            g = step_ms(model, RunningBatch(model), rows, device)
            s = step_ms(model, SlotBatch(model, fused), rows, device)
            times[f"{str(dtype)[6:]} x{rows}"] = {
                "generic_ms": g,
                "slot_fused_ms": s,
                "speedup": round(g / s, 2),
            }
            print(dtype, rows, g, s, flush=True)
        del model, fused
    out["decode_step_ms_smollm2_shape"] = times
    out["note"] = (
        "one run; random weights (the step time does not depend on them); a decode step of a "
        "135M model on a GPU is bound by kernel launches: the fused step makes fewer of them"
    )
    print(json.dumps(out, indent=1))
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / f"slot_cache-{device}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
