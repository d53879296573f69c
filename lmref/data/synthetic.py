"""Synthetic instruction data written by a real model through any OpenAI-compatible server,
kept only where the task's own checker verifies it, and never a copy of an evaluation item.

Two schemes (``SynthConfig.scheme``), self-instruct style (Wang et al. 2022), seeded by the
course's task families:

- ``"self-instruct"``: the model sees a few train items of one family ("Instruction: ... /
  Answer: ...") and writes a new instruction *and* its answer. ``verify`` parses the input back
  out of the instruction, recomputes the answer and keeps the item only when the model's answer
  is exactly right. A 135M model rarely is (see the acceptance rate).
- ``"rephrase"`` (the default): the input is sampled from the family's spec; the model, shown a
  few human wordings of the family with that input (``SEED_WORDINGS``), writes a new wording;
  ``verify`` checks that the input is still there, the task's meaning kept and the wording a
  request, and the answer is *computed* by the checker, not written by the model.
  ``SynthConfig.prompt="verb-led"`` (the default) prefills the new line with one of the family's
  request verbs (``LEAD_VERBS``): a 135M model left to start the line itself (``"list"``) mostly
  writes a bare input, a fragment or a statement (2% accepted against ~50%, benchmark JSON).

Each candidate is then deduplicated against the train (seed) items and the other accepted ones,
and checked for leakage against validation and test (``HeldOut``: exact, same input, rare
n-gram). ``SynthReport`` counts every candidate once: accepted + the rejects by reason =
candidates; the acceptance rate carries its Wilson interval; diversity is the unique-wording
share (the instruction with its input masked) and distinct bigrams.

Usage::

    from openai import OpenAI
    from lmref.data.synthetic import SynthConfig, generate_synthetic

    client = OpenAI(base_url=replica.url + "/v1", api_key="-", max_retries=0)
    rows, report = generate_synthetic(client, "smollm2", raw, SynthConfig(candidates_per_task=40))
    print(report.acceptance, report.rejected, report.diversity)   # rows: task, instruction, answer
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmref.core.stats import Score
from lmref.data.instruction_tasks import TASK_SPECS, checked_example
from lmref.data.synthetic_check import HeldOut, normalise, parse_input, verify

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from openai import OpenAI

# Human-written wordings per family ("{x}" is the input); the first is the course's template.
SEED_WORDINGS: dict[str, tuple[str, ...]] = {
    "date": (
        "Write the date {x} in words.",
        "How is the date {x} written in words?",
        "Spell out the date {x} using words for the month.",
        "Give {x} as a date written in words.",
        "Express the date {x} in words, with the month's name.",
        "Say the date {x} in words.",
    ),
    "time": (
        "Write {x} in 12-hour time.",
        "What is {x} on a 12-hour clock?",
        "Convert {x} to 12-hour time with am or pm.",
        "Give the time {x} in 12-hour format.",
        "Change {x} from 24-hour to 12-hour time.",
        "Tell me {x} as a 12-hour time with am or pm.",
    ),
    "digits": (
        "Spell out the digits of {x}.",
        "Write each digit of {x} as a word.",
        "Read the number {x} digit by digit, in words.",
        "Name the digits of {x} one by one in words.",
        "Say each digit of {x} as a word, in order.",
        "Give the digits of {x} as words.",
    ),
    "reverse": (
        "Reverse the order of the words: {x}",
        "Write these words in reverse order: {x}",
        "Put the words backwards, last first: {x}",
    ),
    "sort": (
        "Sort the words alphabetically: {x}",
        "Put these words in alphabetical order: {x}",
        "List the words from A to Z, sorted alphabetically: {x}",
        "Arrange these words in alphabetical order: {x}",
        "Order the following words alphabetically: {x}",
        "Write these words sorted alphabetically: {x}",
    ),
    "uppercase": (
        "Write in capital letters: {x}",
        "Rewrite these words in uppercase: {x}",
        "Turn the following into capital letters: {x}",
        "Convert these words to uppercase: {x}",
        "Change the following words to capital letters: {x}",
        "Give these words in upper case: {x}",
    ),
    "add": (
        "What is {x}?",
        "Add the numbers: {x}",
        "Compute the sum {x}.",
    ),
}
# The request verbs a "verb-led" rephrase may start with (``synthetic_check.asks`` accepts each):
# the candidate is prefilled with one, so the model writes an instruction, not a statement.
LEAD_VERBS: dict[str, tuple[str, ...]] = {
    "date": ("Write", "Spell out", "Give", "Express", "Say", "Convert", "How is"),
    "time": ("Write", "Convert", "Give", "Change", "Tell me", "Express", "What is"),
    "digits": ("Spell out", "Write", "Read", "Name", "Say", "Give", "List"),
    "reverse": ("Reverse", "Write", "Put", "List", "Give"),
    "sort": ("Sort", "Put", "List", "Arrange", "Order", "Write", "Give"),
    "uppercase": ("Write", "Rewrite", "Turn", "Convert", "Change", "Give", "Capitalize"),
    "add": ("What is", "Add", "Compute", "Calculate", "Give"),
}


@dataclass
class SynthConfig:
    """What to generate, how, and how much; the sampling is seeded (per candidate)."""

    tasks: tuple[str, ...] = ("date", "time", "digits", "sort", "uppercase")
    scheme: str = "rephrase"  # or "self-instruct"
    candidates_per_task: int = 40
    temperature: float = 0.9
    top_p: float = 0.95
    max_tokens: int = 40
    shots: int = 5  # seed wordings shown per request (rephrase) or train items (self-instruct)
    # "verb-led": the candidate starts with one of the family's LEAD_VERBS (prefilled) after the
    # wordings; "list": the model starts the line itself (the first, weaker prompt).
    prompt: str = "verb-led"
    seed: int = 0
    concurrency: int = 16  # requests in flight: the server batches them (max_batch_size 16)
    ngram: int = 3  # the leakage check's n


@dataclass
class SynthReport:
    """Every candidate counted once: accepted + sum(rejected.values()) == candidates."""

    scheme: str
    candidates: int
    accepted: int
    rejected: dict[str, int]
    per_task: dict[str, dict[str, int]]
    diversity: dict[str, float]
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def acceptance(self) -> Score:
        return Score(self.accepted, self.candidates)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.acceptance.interval
        return {
            "scheme": self.scheme,
            "candidates": self.candidates,
            "accepted": self.accepted,
            "acceptance": str(self.acceptance),
            "acceptance_interval": [low, high],
            "rejected": self.rejected,
            "per_task": self.per_task,
            "diversity": self.diversity,
            "examples": self.examples,
        }


def _input_text(task: str, instruction: str, spec: Mapping) -> str:
    """The input part of a templated instruction: the text the template's placeholder took."""
    prefix, _, suffix = spec["template"].partition("{")
    suffix = suffix.partition("}")[2]
    return instruction[len(prefix) : len(instruction) - len(suffix)]


def _prompt(task: str, config: SynthConfig, rng: random.Random, seeds: Sequence[Mapping]):
    """One candidate's completion prompt, its stop strings and the text prefilled (the lead)."""
    spec = TASK_SPECS[task]
    if config.scheme == "rephrase":
        instruction, _ = checked_example(task, spec, rng, 0, "TASK_SPECS")
        x = _input_text(task, instruction, spec)
        wordings = rng.sample(SEED_WORDINGS[task], min(config.shots, len(SEED_WORDINGS[task])))
        lines = "\n".join(f"- {w.format(x=x)}" for w in wordings)
        head = f"Different ways to ask for the same task, each a new wording:\n{lines}\n- "
        if config.prompt == "list":
            return head, ["\n"], ""
        lead = rng.choice(LEAD_VERBS[task])
        return head + lead, ["\n"], lead
    if config.scheme == "self-instruct":
        shots = rng.sample([s for s in seeds if s["task"] == task], config.shots)
        lines = "".join(
            f"Instruction: {s['instruction']}\nAnswer: {s['answer']}\n\n" for s in shots
        )
        return f"Examples of one task, then a new one:\n\n{lines}Instruction:", ["\n\n"], ""
    raise ValueError(f"unknown scheme {config.scheme!r}; use 'rephrase' or 'self-instruct'")


def _split_candidate(scheme: str, text: str) -> tuple[str, str | None]:
    if scheme == "rephrase":
        return text.strip(), None
    instruction, _, answer = text.partition("\nAnswer:")
    return instruction.strip(), (answer.strip() if answer else "")


def _wording(task: str, instruction: str) -> str:
    """The instruction with its input masked: what diversity counts (the wording, not inputs)."""
    masked = re.sub(r"\d[\d:-]*", "#", instruction)
    words = set(TASK_SPECS[task].get("words", ()))
    return " ".join("W" if w in words else w for w in normalise(masked).split())


def _distinct(texts: Sequence[str], n: int = 2) -> float:
    grams = [
        tuple(t[i : i + n])
        for t in (normalise(x).split() for x in texts)
        for i in range(len(t) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def generate_synthetic(
    client: OpenAI,
    model: str,
    raw: Mapping[str, Sequence[Mapping]],
    config: SynthConfig | None = None,
) -> tuple[list[dict], SynthReport]:
    """Candidates from ``model`` behind ``client`` -> verified, deduplicated, leakage-checked rows
    (``task``, ``instruction``, ``answer``) and their report. ``raw`` holds the ``train`` (seed)
    split and the ``validation`` and ``test`` splits nothing may leak into."""
    config = config or SynthConfig()
    for task in config.tasks:
        if task not in SEED_WORDINGS:
            raise ValueError(f"unknown task {task!r}; known: {sorted(SEED_WORDINGS)}")
    if config.prompt not in ("verb-led", "list"):
        raise ValueError(f"unknown prompt {config.prompt!r}; use 'verb-led' or 'list'")
    for split in ("train", "validation", "test"):
        if split not in raw:
            raise ValueError(f"raw needs a {split!r} split; it has {sorted(raw)}")
    held_out = HeldOut.of(raw["validation"], raw["test"], n=config.ngram)
    seen = {normalise(r["instruction"]) for r in raw["train"]}
    seeds = [r for r in raw["train"] if r["task"] in config.tasks][: 50 * len(config.tasks)]
    jobs = []
    for task in config.tasks:
        for i in range(config.candidates_per_task):
            rng = random.Random(f"{config.seed}-{task}-{i}")  # str seeds are stable across runs
            prompt, stop, lead = _prompt(task, config, rng, seeds)
            jobs.append((task, prompt, stop, rng.randrange(2**31), lead))

    def ask(job) -> str:
        task, prompt, stop, seed, lead = job
        out = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=seed,
            stop=stop,
        )
        return lead + out.choices[0].text  # the prefilled verb is part of the wording

    with ThreadPoolExecutor(config.concurrency) as pool:
        texts = list(pool.map(ask, jobs))
    rows: list[dict] = []
    rejected: Counter[str] = Counter()
    per_task = {t: {"candidates": 0, "accepted": 0} for t in config.tasks}
    examples: dict[str, list[str]] = {"accepted": [], "rejected": []}
    for (task, *_), text in zip(jobs, texts):
        per_task[task]["candidates"] += 1
        instruction, answer = _split_candidate(config.scheme, text)
        verdict = verify(task, instruction, answer, TASK_SPECS)
        reason = verdict.reason
        if verdict.accepted:
            leak = held_out.leak(instruction, verdict.key)
            if leak:
                reason = f"leak ({leak})"
            elif normalise(instruction) in seen:
                reason = "duplicate"
        if reason != "accepted":
            rejected[reason.split(" (")[0] if reason.startswith("no input") else reason] += 1
            if len(examples["rejected"]) < 8:
                examples["rejected"].append(f"{task}: {instruction!r} -> {reason}")
            continue
        seen.add(normalise(instruction))
        rows.append({"task": task, "instruction": instruction, "answer": verdict.answer})
        per_task[task]["accepted"] += 1
        if len(examples["accepted"]) < 8:
            examples["accepted"].append(f"{task}: {instruction!r} -> {verdict.answer!r}")
    instructions = [r["instruction"] for r in rows]
    wordings = {_wording(r["task"], r["instruction"]) for r in rows}
    known = {_wording(t, w.format(x="0")) for t in config.tasks for w in SEED_WORDINGS[t]}
    report = SynthReport(
        scheme=config.scheme,
        candidates=len(jobs),
        accepted=len(rows),
        rejected=dict(rejected),
        per_task=per_task,
        diversity={
            "unique_wordings": len(wordings),
            "unique_wording_ratio": len(wordings) / len(rows) if rows else 0.0,
            "new_wordings": len(wordings - known),  # not one of SEED_WORDINGS
            "distinct_bigrams": _distinct(instructions),
        },
        examples=examples,
    )
    return rows, report


def matched_control(
    train: Sequence[Mapping], synthetic: Sequence[Mapping], skip: int
) -> list[dict]:
    """The control arm of a synthetic-data experiment: ordinary (templated) train items, as many
    per task as ``synthetic`` holds, taken past the first ``skip`` rows (the seed items) so the
    control adds new items, not repeats. Seed + synthetic against seed + this control, same
    steps: a gain of the first says the model's wordings helped, not merely more items."""
    want = Counter(r["task"] for r in synthetic)
    picked = []
    for row in itertools.islice(train, skip, None):  # a list or a datasets.Dataset, not copied
        if want[row["task"]] > 0:
            want[row["task"]] -= 1
            picked.append({k: row[k] for k in ("task", "instruction", "answer")})
        if not +want:  # every task filled
            break
    if +want:
        raise ValueError(f"the train split is too short for the control arm: missing {dict(+want)}")
    return picked


__all__ = [
    "LEAD_VERBS",
    "SEED_WORDINGS",
    "SynthConfig",
    "SynthReport",
    "generate_synthetic",
    "matched_control",
    "parse_input",
]
