"""The real pretrained model of the course, offline: SmolLM2-135M-Instruct from its packaged GGUF.

Converted once into artifacts/ (``lmref.models.loading.resolve_model``, converting with
``lmref.models.real_model.convert_gguf``); these tests check that the
conversion is faithful (logits equal to the GGUF-loaded model's) and that the model is the real
chat model (it knows the capital of France through its chat template).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GgufConfig

from lmref.models.loading import load_model, load_tokenizer, resolve_model
from lmref.models.real_model import NAMED_MODELS, convert_gguf, packaged_gguf_path

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(NAME, device="cpu").eval(), load_tokenizer(NAME)


@pytest.mark.slow
def test_france_question_is_answered_with_paris(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_converted_logits_equal_the_gguf_loaded_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    gguf = packaged_gguf_path(NAMED_MODELS[NAME])
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")[
        "input_ids"
    ]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@pytest.mark.unit
def test_conversion_refuses_a_file_with_the_wrong_hash(tmp_path):
    gguf = packaged_gguf_path(NAMED_MODELS[NAME])
    with pytest.raises(ValueError, match="sha256"):
        convert_gguf(gguf, tmp_path / "out", sha256="0" * 64)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_names_resolve_and_paths_pass_through(tmp_path):
    assert resolve_model(NAME).endswith(NAME)
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.slow
def test_server_cli_resolves_course_names_and_defaults_to_the_real_model(tmp_path):
    from lmref.serve import resolve_model_args

    folder = resolve_model(NAME)
    assert resolve_model_args([]) == ["--model", f"smollm2={folder}"]
    argv = resolve_model_args(
        ["--model", f"chat={NAME}", "--model", f"mine={tmp_path}", "--port", "0"]
    )
    assert argv == ["--model", f"chat={folder}", "--model", f"mine={tmp_path}", "--port", "0"]
