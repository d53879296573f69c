"""Shared fixtures: a tiny random Llama and a BPE tokenizer, built locally in seconds; the real
SmolLM2-135M-Instruct behind lmref's server; and the rule that every test is exactly one of
unit, integration or slow (markers in pyproject.toml).

The model fixtures use only transformers/tokenizers (not lmref's model code) so every module's
tests can run alone; the server fixture imports lmref's server when a test asks for it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from lmref.core.manifest import write_manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = ("unit", "integration", "slow")
HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m unit` deselects: every collected test is seen
def pytest_collection_modifyitems(config, items):
    """Stop the run when a test under tests/ is not exactly one of unit, integration, slow: a new
    test file without ``pytestmark = pytest.mark.<size>`` would otherwise silently miss from
    ``make unit`` (or run there when it starts servers)."""
    wrong = []
    for item in items:
        if not item.path.resolve().is_relative_to(HERE):
            continue  # notebook cells under nbval
        sizes = sorted({m.name for m in item.iter_markers() if m.name in SIZES})
        if len(sizes) != 1:
            wrong.append(f"{item.nodeid} ({', '.join(sizes) or 'none'})")
    if wrong:
        raise pytest.UsageError(
            f"each test needs exactly one of the markers {', '.join(SIZES)} "
            "(pytestmark = pytest.mark.unit at the top of the file):\n  " + "\n  ".join(wrong)
        )


def _stdlib_text(limit: int = 400) -> list[str]:
    import collections  # noqa: E401  (a handful of modules is enough)
    import json
    import re
    import string
    import textwrap

    docs = []
    for mod in (collections, json, re, string, textwrap, inspect):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                docs.append(doc)
    return docs[:limit]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE (vocab 512) with bos/eos/pad, trained on a few stdlib docstrings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_stdlib_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A Hugging Face folder (safetensors + tokenizer) holding a random 2-layer Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    write_manifest(path)  # as every folder lmref saves: the server serves only verified ones
    return path


REAL_MODEL = HERE.parent / "artifacts" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_server():
    """The real SmolLM2-135M-Instruct served in-process as model ``smol`` (8 rows a batch, no
    response cache, one torch thread): one server per test module that asks for it."""
    if not (REAL_MODEL / "config.json").exists():
        pytest.skip("artifacts/smollm2-135m-instruct not built")
    from lmref.serve import start_server
    from lmref.serving.app import ModelSpec, ServingConfig

    config = ServingConfig(
        models=[ModelSpec("smol", str(REAL_MODEL), max_batch_size=8)],
        api_keys=[],
        cache_size=0,
        torch_threads=1,
    )
    handle = start_server(config)
    yield handle
    handle.stop(drain_timeout=5)


@pytest.fixture(scope="module")
def smol_client(smol_server):
    """The official ``openai`` client on ``smol_server`` (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
