"""Pruning and quantization on the tiny fixture model: exact sparsity, Wanda's choice, 2:4 pattern,
clean save/load, quantized quality within a stated bound, sizes that match the saved bytes."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lmref.compression import (
    SAVE_SUPPORT,
    PruneConfig,
    collect_input_norms,
    disk_bytes,
    is_n_m_sparse,
    load_bnb,
    measure,
    memory_bytes,
    out_in_weight,
    prunable_linears,
    prune_model,
    pruning_leftovers,
    quantize_int8_dynamic,
    recover,
    save_model,
    sparsity_report,
)
from lmref.core.losses import IGNORE_INDEX, perplexity

# Stated bounds: relative perplexity increase over fp32 on the briefly fitted fixture model.
# Measured there: int8 dynamic +0.6%, bnb int8 +0.002%, nf4 +0.09%; the bounds leave room for
# other seeds and library versions, and a broken quantizer lands far outside them.
PPL_BOUND = {"int8-dynamic": 0.02, "bnb-int8": 0.02, "nf4": 0.05}

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def token_rows(tiny_tokenizer):
    import inspect
    import json
    import re

    text = " ".join(inspect.getdoc(o) or "" for o in (json, re, inspect, json.dumps, re.sub))
    ids = tiny_tokenizer(text)["input_ids"]
    block = 64
    rows = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    return rows[:-4], rows[-4:]  # train rows, validation rows


@pytest.fixture(scope="module")
def fitted_dir(tiny_model_dir, token_rows, tmp_path_factory):
    """The fixture model after 40 AdamW steps on docstrings: far from uniform, so quantization
    error shows in perplexity (a random model sits at ppl ~ vocab whatever is done to it)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train, _ = token_rows
    for step in range(40):
        batch = train[(step * 8) % len(train) :][:8]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("fitted")
    model.save_pretrained(path)
    return path


@pytest.fixture
def model(fitted_dir):
    return AutoModelForCausalLM.from_pretrained(fitted_dir).eval()


@pytest.mark.parametrize("scope", ["layer", "global", "row"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_magnitude_reaches_exact_sparsity(model, scope, sparsity):
    report = prune_model(model, PruneConfig("magnitude", sparsity, scope=scope))
    layers = prunable_linears(model)
    expected = (
        sum(round(sparsity * m.weight.numel()) for m in layers.values())
        if scope == "layer"
        else round(sparsity * report["weights"])
        if scope == "global"
        else sum(round(sparsity * m.in_features) * m.out_features for m in layers.values())
    )
    assert report["zeros"] == expected
    # rows of 64 round 0.3 * 64 to 19 zeros (29.7%): the requested share, to one weight per row
    assert report["global"] == pytest.approx(sparsity, abs=1e-3 if scope != "row" else 1 / 64)
    if scope != "global":  # every layer hits the target, not just the sum
        assert all(s == pytest.approx(sparsity, abs=0.01) for s in report["layers"].values())
    else:  # global lets layers differ
        assert len({round(s, 3) for s in report["layers"].values()}) > 1
    assert "lm_head" not in report["layers"]


def test_magnitude_prunes_smallest_weights(model):
    layer = prunable_linears(model)["model.layers.0.mlp.up_proj"]
    before = layer.weight.detach().abs().clone()
    prune_model(model, PruneConfig("magnitude", 0.5))
    kept = layer.weight != 0
    assert before[kept].min() >= before[~kept].max()


def test_wanda_uses_activation_norms_not_magnitude():
    # Row [1.0, 0.5, 0.4, 0.1]; input channel 3 is always 100x larger than the others.
    # ||X|| = sqrt([2, 2, 2, 20000]); magnitude drops columns 2 and 3, while Wanda's scores
    # |W|*||X|| = [1.41, 0.71, 0.57, 14.1] drop columns 1 and 2 and keep the small weight 0.1.
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.5, 0.4, 0.1]]))
    x = torch.tensor([[1.0, 1.0, 1.0, 100.0], [-1.0, 1.0, -1.0, 100.0]])

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = layer

        def forward(self, input_ids):
            return self.proj(input_ids)

    wrapper = Wrapper()
    norms = collect_input_norms(wrapper, [{"input_ids": x}], {"proj": layer})
    assert torch.allclose(norms["proj"], torch.tensor([2.0, 2.0, 2.0, 20000.0]).sqrt())
    assert not layer._forward_hooks, "calibration hooks must be removed"

    magnitude = nn.Linear(4, 1, bias=False)
    magnitude.load_state_dict(layer.state_dict())
    prune_model(nn.Sequential(magnitude), PruneConfig("magnitude", 0.5, skip=()))
    assert magnitude.weight.tolist() == [[1.0, 0.5, 0.0, 0.0]]

    prune_model(wrapper, PruneConfig("wanda", 0.5, skip=()), calibration_batches=[x])
    assert layer.weight.tolist() == [[1.0, 0.0, 0.0, pytest.approx(0.1)]]
    assert pruning_leftovers(wrapper) == []


def test_wanda_needs_calibration(model):
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, PruneConfig("wanda", 0.5))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_holds_in_every_group(model, token_rows, method):
    calib = [token_rows[0][:4]] if method == "wanda" else None
    report = prune_model(model, PruneConfig(method, n_m=(2, 4)), calibration_batches=calib)
    assert report["global"] == pytest.approx(0.5, abs=1e-3)
    for name, layer in prunable_linears(model).items():
        groups = (layer.weight != 0).reshape(-1, 4).sum(1)
        assert (groups <= 2).all(), name
        assert is_n_m_sparse(layer.weight, 2, 4)
    dense = torch.ones(2, 8)
    assert not is_n_m_sparse(dense, 2, 4)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="sparsity"):
        PruneConfig("magnitude", 1.0)
    with pytest.raises(ValueError, match="method"):
        PruneConfig("random", 0.5)
    with pytest.raises(ValueError, match="n_m"):
        PruneConfig(n_m=(4, 2))
    with pytest.raises(ValueError, match="multiple"):
        prune_model(nn.Sequential(nn.Linear(6, 2)), PruneConfig(n_m=(2, 4), skip=()))


def test_pruned_model_is_plain_and_round_trips(model, tmp_path, token_rows):
    prune_model(model, PruneConfig("wanda", 0.5), calibration_batches=[token_rows[0][:4]])
    assert pruning_leftovers(model) == []
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    save_model(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert sparsity_report(reloaded)["global"] == pytest.approx(0.5, abs=1e-3)


def test_recover_trains_but_keeps_zeros(model, token_rows):
    prune_model(model, PruneConfig("magnitude", 0.6))
    zeros_before = {n: m.weight == 0 for n, m in prunable_linears(model).items()}
    weights_before = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    train = token_rows[0]

    def train_fn(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for i in range(3):
            m(input_ids=train[i : i + 4], labels=train[i : i + 4]).loss.backward()
            opt.step()
            opt.zero_grad()
        return "trained"

    assert recover(model, train_fn) == "trained"
    assert pruning_leftovers(model) == []
    for name, layer in prunable_linears(model).items():
        assert torch.equal(layer.weight == 0, zeros_before[name]), name
        assert not torch.equal(layer.weight, weights_before[name]), f"{name} did not train"


def test_reported_sizes_match_saved_bytes(model, tmp_path, token_rows):
    save_model(model, tmp_path)
    m = measure(model, token_rows[1], name="fp32", saved_dir=tmp_path, new_tokens=4, repeats=1)
    files = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert m.disk_mb * 2**20 == files
    weights_file = disk_bytes(tmp_path, "*.safetensors")
    # safetensors = the tensors' bytes + a JSON header naming them (a few KB)
    assert 0 < weights_file - memory_bytes(model) < 16_384
    assert memory_bytes(model) == pytest.approx(m.memory_mb * 2**20)
    assert m.eval_tokens == token_rows[1][:, 1:].numel()
    assert m.decode_tokens_per_s > 0 and m.prefill_tokens_per_s > 0


def test_quantized_variants_are_quantized_and_stay_within_bound(fitted_dir, token_rows, tmp_path):
    """Each variant really is quantized (its own layer type, fewer bytes, logits that moved, 4-bit
    weights that dequantize near the originals) and its perplexity stays within the stated bound.
    The test this replaces checked only an upper bound on perplexity, which a quantizer that did
    nothing passes, and that a constant dict holds one of its own keys."""
    import bitsandbytes as bnb

    _, valid = token_rows
    base_model = AutoModelForCausalLM.from_pretrained(fitted_dir).eval()
    base = measure(base_model, valid, name="fp32", new_tokens=4, repeats=1)
    vocab = base_model.config.vocab_size
    assert base.perplexity < 0.6 * vocab, "the fitted model should be far from uniform"
    with torch.inference_mode():
        base_logits = base_model(input_ids=valid).logits
    int8 = quantize_int8_dynamic(base_model)
    with pytest.raises(TypeError) as refused:
        save_model(int8, tmp_path / "int8")
    assert str(refused.value) == SAVE_SUPPORT["int8-dynamic"]
    variants = {
        "int8-dynamic": int8,
        "bnb-int8": load_bnb(fitted_dir, "int8", device="cpu"),
        "nf4": load_bnb(fitted_dir, "nf4", device="cpu"),
    }
    layer_type = {
        "int8-dynamic": torch.ao.nn.quantized.dynamic.Linear,
        "bnb-int8": bnb.nn.Linear8bitLt,
        "nf4": bnb.nn.Linear4bit,
    }
    # nf4 before its first forward (bitsandbytes repacks 4-bit weights for its CPU kernel then)
    up = variants["nf4"].model.layers[0].mlp.up_proj.weight
    dequantized = bnb.functional.dequantize_4bit(up.data, up.quant_state)
    original = base_model.model.layers[0].mlp.up_proj.weight.detach()
    error = ((dequantized - original).norm() / original.norm()).item()
    assert 0 < error < 0.15, error  # nf4's rounding: a few percent, never zero
    for name, variant in variants.items():
        assert isinstance(variant.model.layers[0].self_attn.q_proj, layer_type[name]), name
        assert memory_bytes(variant) < 0.6 * memory_bytes(base_model), name
        with torch.inference_mode():
            assert not torch.equal(variant(input_ids=valid).logits, base_logits), name
        ppl = measure(variant, valid, name=name, new_tokens=4, repeats=1).perplexity
        bound = PPL_BOUND[name]
        assert abs(ppl / base.perplexity - 1) <= bound, (name, ppl, base.perplexity)


def test_bnb_4bit_saves_and_reloads_quantized(fitted_dir, token_rows, tmp_path):
    nf4 = load_bnb(fitted_dir, "nf4", device="cpu")
    save_model(nf4, tmp_path)
    m = measure(nf4, token_rows[1], name="nf4", saved_dir=tmp_path, new_tokens=4, repeats=1)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    again = measure(reloaded, token_rows[1], name="nf4-reloaded", new_tokens=4, repeats=1)
    assert again.perplexity == pytest.approx(m.perplexity, rel=1e-4)
    fp32_bytes = memory_bytes(AutoModelForCausalLM.from_pretrained(fitted_dir))
    assert disk_bytes(tmp_path, "*.safetensors") < fp32_bytes


def test_bnb_4bit_saved_after_a_forward_reloads_to_the_same_logits(
    fitted_dir, token_rows, tmp_path
):
    """bitsandbytes repacks 4-bit weights for its CPU kernel on the first inference forward (on
    CPUs with AVX512-BF16); a folder saved after that used to reload as garbage."""
    ids = token_rows[1]
    for double_quant in (False, True):
        nf4 = load_bnb(fitted_dir, "nf4", device="cpu", double_quant=double_quant)
        with torch.inference_mode():
            before = nf4(input_ids=ids).logits
        memory_bytes(nf4)  # a state_dict() before saving, as measure() does
        save_model(nf4, tmp_path / str(double_quant))
        reloaded = AutoModelForCausalLM.from_pretrained(
            tmp_path / str(double_quant), device_map="cpu"
        )
        with torch.inference_mode():
            assert torch.equal(reloaded.eval()(input_ids=ids).logits, before)
            assert torch.equal(
                nf4(input_ids=ids).logits, before
            )  # saving changed nothing in memory


def test_gpt2_conv1d_layers_prune_and_quantize(token_rows):
    from lmref.models.presets import build_model

    gpt2 = build_model("tiny-gpt2", vocab_size=512, num_hidden_layers=2).eval()
    layers = prunable_linears(gpt2)
    assert {type(m).__name__ for m in layers.values()} == {"Conv1D"}
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(gpt2)
        report = prune_model(
            model, PruneConfig(method, n_m=(2, 4)), calibration_batches=[token_rows[0][:2]]
        )
        assert report["global"] == pytest.approx(0.5, abs=1e-3)
        for layer in prunable_linears(model).values():  # 2 of every 4 kept along the INPUT dim
            assert is_n_m_sparse(out_in_weight(layer), 2, 4)
            assert (out_in_weight(layer) != 0).reshape(-1, 4).sum(1).eq(2).all()
    int8 = quantize_int8_dynamic(gpt2)
    assert memory_bytes(int8) < 0.7 * memory_bytes(gpt2)
    with torch.inference_mode():
        dense, quant = gpt2(input_ids=token_rows[1]).logits, int8(input_ids=token_rows[1]).logits
    assert (quant - dense).abs().mean() < 0.05 * dense.abs().mean()


def _masked_rows(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows with a prompt that does not count (labels -100) and a padded tail on the first row."""
    labels = rows.clone()
    labels[:, :20] = IGNORE_INDEX
    mask = torch.ones_like(rows)
    mask[0, 40:] = 0
    return {"input_ids": rows, "labels": labels, "attention_mask": mask}


def test_measure_counts_labels_and_padding_like_the_one_loss(model, token_rows):
    """measure's loss is lmref.core.losses' on the same rows: -100 labels and padding do not
    count (it used to score every next token of input_ids, ignoring both)."""
    from datasets import Dataset

    columns = _masked_rows(token_rows[1])
    expected = perplexity(model, [columns])
    # counted by hand: targets 20..63 of every row (position 19 predicts the first), padded
    # targets 40..63 of row 0 left out
    rows = len(columns["input_ids"])
    assert expected["tokens"] == rows * 44 - 24
    for data in (
        columns,
        Dataset.from_dict({k: v.tolist() for k, v in columns.items()}),
        columns_as_rows(columns),
    ):
        m = measure(model, data, batch_size=3, new_tokens=0)
        assert m.eval_tokens == expected["tokens"]
        assert m.loss == pytest.approx(expected["loss"], rel=1e-9)
    unmasked = measure(model, columns["input_ids"], new_tokens=0)
    assert unmasked.eval_tokens == columns["input_ids"][:, 1:].numel()
    assert abs(unmasked.loss - expected["loss"]) > 1e-3
    with pytest.raises(ValueError, match="no tokens"):
        measure(
            model,
            {**columns, "labels": torch.full_like(columns["labels"], IGNORE_INDEX)},
            new_tokens=0,
        )


def columns_as_rows(columns: dict[str, torch.Tensor]) -> list[dict]:
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def test_measure_times_every_forward_and_generation_through_timed(model, token_rows, monkeypatch):
    from lmref.compression import measurement

    waits = []
    real = measurement.synchronize
    monkeypatch.setattr(
        measurement, "synchronize", lambda device: waits.append(str(device)) or real(device)
    )
    measure(model, token_rows[1], batch_size=2, new_tokens=2, repeats=3)
    batches = -(-len(token_rows[1]) // 2)
    assert waits == ["cpu"] * 2 * (batches + 3)  # before and after each timed call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_synchronizes_a_cuda_model(fitted_dir, token_rows, monkeypatch):
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: calls.append(device) or real(device)
    )
    gpu = AutoModelForCausalLM.from_pretrained(fitted_dir).cuda().eval()
    m = measure(gpu, token_rows[1], batch_size=2, new_tokens=2, repeats=2)
    batches = -(-len(token_rows[1]) // 2)
    assert len(calls) == 2 * (batches + 2) and m.device.startswith("cuda")


@pytest.mark.parametrize(
    "label, config",
    [
        ("magnitude", PruneConfig("magnitude")),
        ("wanda", PruneConfig("wanda")),
        ("magnitude 2:4", PruneConfig("magnitude", n_m=(2, 4))),
        ("wanda 2:4", PruneConfig("wanda", n_m=(2, 4))),
    ],
)
def test_sparsity_curve_prunes_like_prune_model_and_restores(model, token_rows, label, config):
    """Each point of the curve zeroes exactly the weights prune_model zeroes with the same config
    (the fitted weights have no ties), and the model is dense again afterwards."""
    from lmref.compression.curve import sparsity_curve

    calib = [token_rows[0][:4]]
    dense = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    seen = []

    def evaluate(m):
        seen.append({n: (layer.weight == 0).clone() for n, layer in prunable_linears(m).items()})
        return float(len(seen))

    rows = sparsity_curve(model, {label: config}, [0.0, 0.3, 0.6], evaluate, [*calib])
    points = [0.5] if config.n_m else [0.0, 0.3, 0.6]
    assert [r["sparsity"] for r in rows] == points and [r["method"] for r in rows] == [label] * len(
        points
    )
    for name, layer in prunable_linears(model).items():
        assert torch.equal(layer.weight, dense[name]), f"{name} not restored"
    for row, zeros in zip(rows, seen):
        reference = copy.deepcopy(model)
        report = prune_model(reference, replace(config, sparsity=row["sparsity"]), calib)
        assert row["achieved"] == pytest.approx(report["global"], abs=1e-9)
        for name, layer in prunable_linears(reference).items():
            assert torch.equal(zeros[name], layer.weight == 0), (label, row["sparsity"], name)


def test_sparsity_curve_evaluates_the_dense_model_once(model):
    from lmref.compression.curve import sparsity_curve

    calls = []
    rows = sparsity_curve(
        model,
        {"a": PruneConfig("magnitude"), "b": PruneConfig("magnitude", scope="row")},
        [0.0, 0.5],
        lambda m: calls.append(1) or float(len(calls)),
    )
    assert len(calls) == 3 and rows[0]["value"] == rows[2]["value"] == 1.0
    with pytest.raises(ValueError, match="sparsities"):
        sparsity_curve(model, {"a": PruneConfig()}, [1.0], lambda m: 0.0)
    with pytest.raises(ValueError, match="'row' or 'layer'"):
        sparsity_curve(model, {"g": PruneConfig(scope="global")}, [0.5], lambda m: 0.0)
