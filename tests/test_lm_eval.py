"""lm-evaluation-harness itself (``lm-eval run --model local-completions``, through
``lmref.evaluation.harness.run_harness``) against a real server on 127.0.0.1: a multiple-choice
(log-likelihood) task and a generate-until task written as local files, plus the course's
instruction tasks as both kinds (``write_instruction_tasks``), in one lm-eval run; its results
checked against the same model scored and run directly in this test.

local-completions tokenizes with the model's own tokenizer (``tokenizer_backend=huggingface``),
sends token-id prompts, and scores a continuation with ``echo: true, logprobs: 1, max_tokens: 1``,
reading ``token_logprobs[ctxlen:-1]``; generation sends ``stop`` and ``max_tokens``.
"""

from __future__ import annotations

import pytest
import torch

from lmref.data.instructions import InstructionConfig, make_instruction_dataset
from lmref.evaluation.harness import (
    HarnessConfig,
    run_harness,
    write_instruction_tasks,
    write_tasks,
)
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
        {"prompt": p, "target": w.strip() if i < len(GEN_PROMPTS) // 2 else w + " (not this)"}
        for i, (p, w) in enumerate(zip(GEN_PROMPTS, written))
    ]
    tasks = write_tasks(tmp_path, gen_docs, choice_docs, max_gen_toks=8)
    # The course's instruction tasks as both kinds, in the same lm-eval run.
    rows = list(
        make_instruction_dataset(
            InstructionConfig(train_per_task=10, validation_per_task=1, test_per_task=6)
        )[0]["test"]
    )[:15]
    tasks += write_instruction_tasks(tmp_path, rows, n_choices=3, max_gen_toks=8, prefix="course")

    server = start_server(
        ServingConfig(
            models=[ModelSpec("tiny", str(tiny_model_dir))],
            api_keys=[KEY],
            cache_size=0,
            torch_threads=1,
        )
    )
    try:
        config = HarnessConfig(server.url, "tiny", str(tiny_model_dir), api_key=KEY)
        config.max_length, config.batch_size = 256, 4
        found = run_harness(config, tmp_path, tasks)
    finally:
        server.stop(drain_timeout=5)

    expected_acc = sum(b == a for b, a in zip(best, answers)) / len(answers)
    assert found["lmref_choice"].value == pytest.approx(expected_acc)
    assert found["lmref_gen"].value == pytest.approx(
        sum(d["target"] == w.strip() for d, w in zip(gen_docs, written)) / len(gen_docs)
    )
    # The Score counted from the per-sample logs is lm-eval's metric, with an interval.
    for result in found.values():
        assert result.score.value == pytest.approx(result.value)
    assert found["course_gen"].score.total == found["course_choice"].score.total == len(rows)
    # The instruction multiple-choice task: each choice's log-likelihood is the direct one of
    # prompt + choice (no delimiter: the prompt ends in a newline), the gold index its answer.
    # lm-eval moves a context's trailing whitespace into the continuation, so the newline is
    # scored as part of every choice (the same shift for all: the ranking is unchanged).
    for sample in found["course_choice"].samples[:3]:
        doc = sample["doc"]
        assert doc["choices"][doc["answer"]] == rows[sample["doc_id"]]["answer"]
        direct_scores = [
            loglikelihood(model, tokenizer, doc["question"][:-1], "\n" + c) for c in doc["choices"]
        ]
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(direct_scores, abs=1e-3)
    # Per document: the log-likelihoods lm-eval got from the server are the direct ones, and so
    # are the generations.
    samples = found["lmref_choice"].samples
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx(scores[sample["doc_id"]], abs=1e-3)
    samples = found["lmref_gen"].samples
    assert sorted((s["doc_id"], s["resps"][0][0]) for s in samples) == list(enumerate(written))
