"""The slot KV cache and fused decode step (lmref.serving.slot_batch, .fused_llama) against the
generic batch (lmref.serving.batching, transformers' forward) on the tiny random Llama: the same
logits at every step through joins (a shared prompt start, padding inside a prefill), leaves
that move rows into freed slots, and the cache growing past its first size; the engine writes
the same greedy text with and without it."""

from __future__ import annotations

import pytest
import torch

from lmref.serving.batching import Prefill, PrefixCache, RunningBatch
from lmref.serving.fused_llama import FusedLlama
from lmref.serving.slot_batch import SlotBatch
from lmref.serving.warm_up import warm_up

pytestmark = pytest.mark.unit

PREFIX = list(range(3, 23))  # 20 tokens: a shared start the PrefixCache learns (min 16)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()


def prefilled(model, prompts, prefix):
    prefill = Prefill(model, prompts, pad_id=0, chunk_tokens=7, prefix=prefix)
    while (logits := prefill.step()) is None:
        pass
    return prefill, logits


def test_slot_batch_gives_the_generic_batch_logits_through_joins_leaves_and_growth(model):
    fused = FusedLlama.of(model)
    generic, slots = RunningBatch(model), SlotBatch(model, fused, slots=1, columns=4)  # grows
    rows_g: list[int] = []  # the row ids in each batch's own order
    rows_s: list[int] = []
    groups = [
        [PREFIX + [30, 31], PREFIX + [40]],  # learns the prefix from these two
        [PREFIX + [50, 51, 52, 53], [7, 8]],  # one uses the prefix, one does not: no sharing
        [PREFIX + [60] * 9],
    ]
    tokens: dict[int, int] = {}
    prefixes = (PrefixCache(model, 16), PrefixCache(model, 16))
    leaves = {1: [0, 2], 3: [1, 2]}  # after step s: keep these positions of the generic order
    for step in range(6):
        if step < len(groups):
            base = len(tokens)
            pg, lg = prefilled(model, groups[step], prefixes[0])
            ps, ls = prefilled(model, groups[step], prefixes[1])
            torch.testing.assert_close(lg, ls)  # the same forward
            generic.join(pg)
            slots.join(ps)
            for i, token in enumerate(lg.argmax(-1).tolist()):
                tokens[base + i] = token
                rows_g.append(base + i)
                rows_s.append(base + i)
        logits_g = generic.step([tokens[r] for r in rows_g])
        logits_s = slots.step([tokens[r] for r in rows_s])
        by_row = {r: logits_s[k] for k, r in enumerate(rows_s)}
        # oneDNN's packed, fused matmuls sum in another order: equal to rounding
        torch.testing.assert_close(
            torch.stack([by_row[r] for r in rows_g]), logits_g, rtol=1e-4, atol=1e-4
        )
        for k, r in enumerate(rows_g):
            tokens[r] = int(logits_g[k].argmax())
        if step in leaves:
            kept = [rows_g[k] for k in leaves[step]]
            generic.leave(leaves[step])
            rows_g = kept
            order = slots.leave([k for k, r in enumerate(rows_s) if r in kept])
            rows_s = [rows_s[k] for k in order]
            assert sorted(rows_s) == sorted(kept) and len(slots) == len(kept)
    assert slots.values.shape[1] >= 4 and slots.values.shape[3] >= 32  # grew from 1 x 4
    layers, slot_count, kv_heads, columns, head_dim = slots.values.shape
    assert slots.keys.shape == (layers, slot_count, kv_heads, head_dim, columns)  # transposed
    assert slots.leave([]) == [] and len(slots) == 0
    assert slots.values.shape[1] == 1 and slots.values.shape[3] == 4  # idle: its first size


def test_leave_moves_only_rows_past_the_new_end(model):
    slots = SlotBatch(model, FusedLlama.of(model))
    prefill, _ = prefilled(model, [[5, 6], [5, 6, 7], [5, 6, 7, 8], [9]], None)
    slots.join(prefill)
    before = slots.keys[:, 3, ..., :1].clone(), slots.values[:, 3, :, :1].clone()
    assert slots.leave([0, 2, 3]) == [0, 3, 2]  # row 3 fills row 1's slot; 0 and 2 stay
    assert slots.lengths.tolist() == [2, 1, 4]
    torch.testing.assert_close((slots.keys[:, 1, ..., :1], slots.values[:, 1, :, :1]), before)


def test_fused_weights_for_plain_llama_only(tiny_model_dir, model):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from lmref.serving.packed_linear import pack_linears

    fused = FusedLlama.of(model)
    assert fused is not None and len(fused.layers) == model.config.num_hidden_layers
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert FusedLlama.of(gpt2) is None
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    pack_linears(packed)
    assert FusedLlama.of(packed) is None  # its nn.Linear weights are gone: built before packing


def test_engine_writes_the_same_text_with_and_without_slots(tiny_model_dir):
    from tests.test_batching import job, make_engine

    texts = []
    for slot_cache in (True, False):
        engine = make_engine(tiny_model_dir, max_batch_size=4, slot_cache=slot_cache)
        try:
            jobs = [job(p, 12 + 5 * i) for i, p in enumerate(["def a(", "class B", "x = ", "# "])]
            for j in jobs:
                engine.submit(j)
            texts.append([engine.results(j)[0].text for j in jobs])
            assert isinstance(engine._batch, SlotBatch) is slot_cache
        finally:
            engine.close()
    assert texts[0] == texts[1]


def test_the_warm_up_leaves_nothing_but_the_memory_a_full_batch_runs_in(tiny_model_dir, model):
    """The engine's start-up batch (lmref.serving.warm_up) leaves no row, no counted prompt
    token and no learnt prefix; a burst of max_batch_size rows then decodes in the very slot
    cache it touched (not reallocated), and writes the same text as without the warm-up."""
    from tests.test_batching import job, make_engine

    for batch in (SlotBatch(model, FusedLlama.of(model), slots=3), RunningBatch(model)):
        warm_up(batch, model, rows=3, tokens=5, pad_id=0)
        assert len(batch) == 0
    texts = []
    for tokens in (8, 0):
        engine = make_engine(tiny_model_dir, max_batch_size=4, warm_up_tokens=tokens)
        try:
            cache = engine._batch.keys.data_ptr()
            assert len(engine._batch) == 0 and engine._batch.size == (4, 256)
            assert engine._prefix.ids == []
            counted = engine.metrics.registry.get_sample_value(
                "lmref:prompt_tokens_total", {"model_name": "tiny"}
            )
            assert not counted  # None or 0: no prompt token counted before any request
            jobs = [job(p, 12 + 5 * i) for i, p in enumerate(["def a(", "class B", "x = ", "# "])]
            for j in jobs:
                engine.submit(j)
            texts.append([engine.results(j)[0].text for j in jobs])
            assert engine._batch.keys.data_ptr() == cache
        finally:
            engine.close()
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    ("weights", "tolerance"),
    [("fp16", 2e-2), ("int8", 5e-2), ("int8-bf16", 5e-2), ("int8-dynamic", 0.5)],
)
def test_smaller_decode_weights_stay_near_fp32(model, weights, tolerance):
    prompts = [[5, 6, 7], [9, 10]]
    logits = {}
    for kind in ("same", weights):
        batch = SlotBatch(model, FusedLlama.of(model, kind))
        prefill, first = prefilled(model, prompts, None)
        batch.join(prefill)
        logits[kind] = batch.step(first.argmax(-1).tolist())
    error = (logits[weights] - logits["same"]).abs().max().item()
    assert logits[weights].dtype == torch.float32
    assert 0 < error < tolerance  # changed (smaller weights), but little


def test_smaller_decode_weights_are_refused_where_they_cannot_run(tiny_model_dir, model):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="expected one of"):
        FusedLlama.of(model, "int4")
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    with pytest.raises(ValueError, match="fp32 model on CPU"):
        FusedLlama.of(bf16, "fp16")


def test_the_engine_decodes_with_the_weights_its_spec_names(tiny_model_dir):
    from lmref.serving.fused_llama import SmallLinear
    from tests.test_batching import job, make_engine

    engine = make_engine(tiny_model_dir, decode_weights="fp16")
    try:
        j = job("def a(", 4)
        engine.submit(j)
        assert len(engine.results(j)) == 1
        assert isinstance(engine.served.fused.layers[0].qkv, SmallLinear)
    finally:
        engine.close()
