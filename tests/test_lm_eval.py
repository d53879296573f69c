"""lm-evaluation-harness itself (``lm-eval run --model local-completions``) against a real server
on 127.0.0.1: a multiple-choice (log-likelihood) task and a generate-until task written here as
local files, and its results checked against the same model scored and run directly in this test.

local-completions tokenizes with the model's own tokenizer (``tokenizer_backend=huggingface``),
sends token-id prompts, and scores a continuation with ``echo: true, logprobs: 1, max_tokens: 1``,
reading ``token_logprobs[ctxlen:-1]``; generation sends ``stop`` and ``max_tokens``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmref.serve import start_server
from lmref.serving.app import ModelSpec, ServingConfig

pytestmark = pytest.mark.integration  # lm-eval against a server on 127.0.0.1
KEY = "lm-eval-key"
QUESTIONS = [
    "The list was sorted in",
    "A dictionary maps each",
    "Open the file and",
    "The function returns the",
    "Split the string on",
    "Raise an error if the",
]
CHOICES = [
    ["order", "reverse", "place"],
    ["key to a value", "word", "line"],
    ["read it", "close", "write the data"],
    ["result", "number of items", "value"],
    ["whitespace", "commas", "each line"],
    ["value is negative", "file is missing", "end"],
]
GEN_PROMPTS = [
    "Return a new",
    "Convert the",
    "The default value",
    "Iterate over",
    "If the",
    "Create a",
]


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """How lm-eval splits a pair: the continuation's tokens are those of context + continuation
    after the context's own tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(n_context, len(whole)))


def greedy_until(model, tokenizer, prompt: str, max_tokens: int, until: str) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(
        out[0, ids.input_ids.shape[1] :],
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    return text.split(until)[0]


def write_tasks(folder: Path, choice_docs: list[dict], gen_docs: list[dict]) -> None:
    for name, docs in (("choice", choice_docs), ("gen", gen_docs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "lmref_choice.yaml").write_text(f"""
task: lmref_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (folder / "lmref_gen.yaml").write_text(f"""
task: lmref_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")


def test_lm_eval_local_completions_runs_both_task_kinds(tiny_model_dir, direct, tmp_path):
    model, tokenizer = direct
    # The answers: the direct scoring's favourite for the first half of the questions, another
    # choice for the rest, so the accuracy the server's numbers give is 0.5 only if they rank
    # every choice as the model does.
    scores = [
        [loglikelihood(model, tokenizer, q, " " + c) for c in cs]
        for q, cs in zip(QUESTIONS, CHOICES)
    ]
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    answers = [
        b if i < len(QUESTIONS) // 2 else (b + 1) % len(CHOICES[i]) for i, b in enumerate(best)
    ]
    choice_docs = [
        {"question": q, "choices": c, "answer": a} for q, c, a in zip(QUESTIONS, CHOICES, answers)
    ]
    # Likewise for generation: the first half's targets are what the model writes greedily.
    written = [greedy_until(model, tokenizer, p, 8, "\n") for p in GEN_PROMPTS]
    gen_docs = [
        {"prompt": p, "target": w if i < len(GEN_PROMPTS) // 2 else w + " (not this)"}
        for i, (p, w) in enumerate(zip(GEN_PROMPTS, written))
    ]
    write_tasks(tmp_path, choice_docs, gen_docs)

    server = start_server(
        ServingConfig(
            models=[ModelSpec("tiny", str(tiny_model_dir))],
            api_keys=[KEY],
            cache_size=0,
            torch_threads=1,
        )
    )
    try:
        env = {
            **os.environ,
            "OPENAI_API_KEY": KEY,
            "OMP_NUM_THREADS": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        }
        model_args = (
            f"base_url={server.url}/v1/completions,model=tiny,"
            f"tokenizer_backend=huggingface,tokenizer={tiny_model_dir},"
            "max_length=256,num_concurrent=1,max_retries=1"
        )
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "run",
                "--model",
                "local-completions",
                "--model_args",
                model_args,
                "--tasks",
                "lmref_choice",
                "lmref_gen",
                "--include_path",
                str(tmp_path),
                "--batch_size",
                "4",
                "--log_samples",
                "--output_path",
                str(tmp_path / "out"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    finally:
        server.stop(drain_timeout=5)

    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    expected_acc = sum(b == a for b, a in zip(best, answers)) / len(answers)
    assert results["lmref_choice"]["acc,none"] == pytest.approx(expected_acc)
    assert results["lmref_gen"]["exact_match,none"] == pytest.approx(
        sum(d["target"] == w for d, w in zip(gen_docs, written)) / len(gen_docs)
    )
    # Per document: the log-likelihoods lm-eval got from the server are the direct ones, and so
    # are the generations.
    samples = [
        json.loads(line)
        for line in next((tmp_path / "out").rglob("samples_lmref_choice_*.jsonl")).open()
    ]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx(scores[sample["doc_id"]], abs=1e-3)
    samples = [
        json.loads(line)
        for line in next((tmp_path / "out").rglob("samples_lmref_gen_*.jsonl")).open()
    ]
    assert sorted((s["doc_id"], s["resps"][0][0]) for s in samples) == list(enumerate(written))
