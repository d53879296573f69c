"""lm-evaluation-harness against lmref's own OpenAI-compatible server, as one function call.

lm-eval's ``local-completions`` model talks to any ``/v1/completions`` endpoint: it tokenizes
with the served model's own tokenizer, sends token-id prompts, scores a multiple-choice
continuation with ``echo: true, logprobs: 1, max_tokens: 1`` (reading ``token_logprobs`` of the
continuation) and generates with ``stop`` and ``max_tokens``. Here the tasks are local files
written from the course's own items (no download): a ``generate_until`` task scored by exact
match, and a ``multiple_choice`` log-likelihood task whose distractors are other items' answers
of the same task. Each task's result is a :class:`lmref.core.stats.Score` counted from lm-eval's
per-sample logs (so it carries its Wilson interval) next to lm-eval's own metric.

lm-eval runs as a child process (its CLI): its imports, logging and threads stay out of the
caller (a notebook, or a test that serves the model in this process), and a hung run is killed
by a timeout.

Usage::

    from lmref.evaluation.harness import HarnessConfig, run_harness, write_instruction_tasks

    tasks = write_instruction_tasks("out/tasks", test_rows[:40])   # rows: instruction, answer, task
    config = HarnessConfig(server.url, "smollm2", "artifacts/smollm2-135m-instruct", api_key=KEY)
    results = run_harness(config, "out/tasks", tasks)
    print(results["lmref_gen"].score, results["lmref_choice"].score)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmref.core.stats import Score

# The course's instruction prompt: lmref.data.instructions.PROMPT_TEMPLATE, repeated here because
# stages do not import each other (a chat model passes its chat template as prompt_format).
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Answer:\n"
METRIC = {"generate_until": "exact_match", "multiple_choice": "acc"}


@dataclass
class HarnessConfig:
    """Where the served model is and how lm-eval talks to it."""

    base_url: str  # the server's root, e.g. http://127.0.0.1:8000
    model: str  # the served model's name
    tokenizer: str  # a folder or hub id of the served model's tokenizer
    api_key: str | None = None  # sent as OPENAI_API_KEY (a Bearer header)
    max_length: int = 2048  # lm-eval's context budget for a request
    batch_size: int = 8
    num_concurrent: int = 1
    timeout_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--limit", "10"]


@dataclass(frozen=True)
class TaskResult:
    """One task: lm-eval's metric and value, the same as a Score, and the per-sample logs."""

    task: str
    metric: str
    value: float
    score: Score
    samples: tuple[dict, ...]


def generation_docs(
    rows: Sequence[dict], prompt_format: Callable[[str], str] | None = None
) -> list[dict]:
    """``{"prompt", "target"}`` docs from instruction rows (``instruction``, ``answer``)."""
    fmt = prompt_format or (lambda x: PROMPT_TEMPLATE.format(instruction=x))
    return [{"prompt": fmt(r["instruction"]), "target": r["answer"]} for r in rows]


def choice_docs(
    rows: Sequence[dict],
    prompt_format: Callable[[str], str] | None = None,
    n_choices: int = 4,
    seed: int = 0,
) -> list[dict]:
    """``{"question", "choices", "answer"}`` docs: each row's answer among ``n_choices - 1`` other
    answers of its task (same form, wrong content), at a random position (seeded)."""
    fmt = prompt_format or (lambda x: PROMPT_TEMPLATE.format(instruction=x))
    rng = random.Random(seed)
    docs = []
    for i, row in enumerate(rows):
        others = sorted(
            {r["answer"] for r in rows if r.get("task") == row.get("task")} - {row["answer"]}
        )
        if len(others) < n_choices - 1:
            raise ValueError(
                f"row {i} (task {row.get('task')!r}) has {len(others)} other answers, "
                f"fewer than the {n_choices - 1} distractors n_choices={n_choices} needs"
            )
        choices = rng.sample(others, n_choices - 1)
        gold = rng.randrange(n_choices)
        choices.insert(gold, row["answer"])
        docs.append({"question": fmt(row["instruction"]), "choices": choices, "answer": gold})
    return docs


def write_tasks(
    folder: str | Path,
    gen_docs: Sequence[dict] = (),
    choice: Sequence[dict] = (),
    prefix: str = "lmref",
    max_gen_toks: int = 16,
    until: Sequence[str] = ("\n",),
    target_delimiter: str = " ",
) -> list[str]:
    """Write lm-eval task files (YAML + JSONL) into ``folder`` for the docs given; return the task
    names (``{prefix}_gen``, ``{prefix}_choice``). ``target_delimiter`` joins question and choice
    (lm-eval's default is a space; "" when the prompt ends in a newline)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for kind, docs in (("generate_until", gen_docs), ("multiple_choice", choice)):
        if not docs:
            continue
        name = f"{prefix}_{'gen' if kind == 'generate_until' else 'choice'}"
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        spec = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": kind,
            "metric_list": [{"metric": METRIC[kind]}],
        }
        if kind == "generate_until":
            spec |= {
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{target}}",
                "generation_kwargs": {
                    "until": list(until),
                    "max_gen_toks": max_gen_toks,
                    "do_sample": False,
                    "temperature": 0,
                },
                # leading/trailing spaces are not an error of the answer
                "filter_list": [
                    {
                        "name": "strip",
                        "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}],
                    }
                ],
            }
        else:
            spec |= {
                "doc_to_text": "{{question}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer",
                "target_delimiter": target_delimiter,
            }
        # JSON is YAML: no YAML writer needed, and no quoting of the Jinja braces to get wrong
        (folder / f"{name}.yaml").write_text(json.dumps(spec, indent=1))
        names.append(name)
    return names


def write_instruction_tasks(
    folder: str | Path,
    rows: Sequence[dict],
    prompt_format: Callable[[str], str] | None = None,
    n_choices: int = 4,
    max_gen_toks: int = 16,
    until: Sequence[str] = ("\n",),
    seed: int = 0,
    prefix: str = "lmref",
) -> list[str]:
    """The course's instruction rows (``task``, ``instruction``, ``answer``) as both task kinds:
    exact match of the greedy answer, and the answer's log-likelihood against distractors."""
    return write_tasks(
        folder,
        generation_docs(rows, prompt_format),
        choice_docs(rows, prompt_format, n_choices, seed),
        prefix=prefix,
        max_gen_toks=max_gen_toks,
        until=until,
        target_delimiter="",  # the prompt ends where the answer starts
    )


def run_harness(
    config: HarnessConfig, task_folder: str | Path, tasks: Sequence[str]
) -> dict[str, TaskResult]:
    """Run lm-eval (``local-completions``) on ``tasks`` from ``task_folder`` against the server;
    per task lm-eval's metric and a Score counted from its per-sample logs."""
    folder = Path(task_folder).resolve()
    out = folder / "lm-eval-out"
    model_args = (
        f"base_url={config.base_url.rstrip('/')}/v1/completions,model={config.model},"
        f"tokenizer_backend=huggingface,tokenizer={config.tokenizer},"
        f"max_length={config.max_length},num_concurrent={config.num_concurrent},max_retries=1"
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(folder / "hf-datasets"),  # per folder: no stale cached task data
        "OPENAI_API_KEY": config.api_key or "none",  # lm-eval always sends a Bearer header
    }
    command = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "local-completions",
        "--model_args", model_args,
        "--tasks", *tasks,
        "--include_path", str(folder),
        "--batch_size", str(config.batch_size),
        "--log_samples",
        "--output_path", str(out),
        *config.extra_args,
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=config.timeout_s)
    if run.returncode != 0:
        raise RuntimeError(
            f"lm-eval exited with {run.returncode}: {run.stderr[-3000:] or run.stdout[-3000:]}"
        )
    results_file = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(results_file.read_text())
    found = {}
    for task in tasks:
        kind = results["configs"][task]["output_type"]
        metric = METRIC[kind]
        key = next(k for k in results["results"][task] if k.startswith(f"{metric},"))
        log = max(
            results_file.parent.glob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime
        )
        samples = tuple(json.loads(line) for line in log.open())
        correct = sum(float(s[metric]) == 1.0 for s in samples)
        found[task] = TaskResult(
            task,
            metric,
            float(results["results"][task][key]),
            Score(correct, len(samples)),
            samples,
        )
    return found
