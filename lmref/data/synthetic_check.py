"""The verifier and the leakage check of synthetic instruction data: one concern, "may this
generated example be trained on?".

``verify`` is each task family's own checker: it parses the input back out of a generated
instruction (an ISO date, an hh:mm time, a number, a run of the family's words, two addends),
checks the instruction still asks for this family's transformation (its keywords, and no other
word family's) and is a request at all (``asks``: it opens with an instruction verb or is a
question), recomputes the answer from the parsed input and, when the generator wrote an
answer too, accepts only an exact match. Anything it cannot parse is rejected, never guessed.
``HeldOut`` holds the validation and test items: a candidate is a leak when its normalised
instruction equals one of theirs, when it carries the same task input (the same date, the same
words...: a new wording of a test item is still that item), or when it shares a rare word
n-gram with one (an n-gram found in one held-out item only carries its input, not template
text). Hand-written regular expressions, not a library: the checks are the task definitions.

Usage::

    from lmref.data.instruction_tasks import TASK_SPECS
    from lmref.data.synthetic_check import HeldOut, verify

    verify("add", "How much is 41 plus 7?", "48", TASK_SPECS)   # Verdict(True, '48', 'accepted')
    verify("add", "How much is 41 plus 7?", "47", TASK_SPECS).reason   # 'wrong answer'
    held_out = HeldOut.of(raw["validation"], raw["test"])
    held_out.leak("time", "Write 12:48 in 12-hour time.")               # 'exact' or 'input' or ...
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

WORD_TASKS = ("reverse", "sort", "uppercase")
# What a wording must say for the instruction to still mean its task (case-insensitive).
MEANING = {
    "date": r"word|spell|written|write .*out",
    "time": r"12[- ]?hour|\ba\.?m\.?\b|\bp\.?m\.?\b|twelve",
    # "digit" itself: "5308 in words" asks for "five thousand three hundred eight", not digits.
    "digits": r"digit",
    "reverse": r"revers|backward|opposite order|last to first|\binvert",
    "sort": r"alphabet|\bsort|a to z|\ba-z\b",
    "uppercase": r"capital|upper ?case|\bcaps\b|block letters",
    "add": r"plus|\badd|\bsum\b|\+|total",
}
# A request opens with an instruction verb (after an optional "please" / "can you") or ends
# with "?": a statement that merely mentions the task ("The digits of 4875 are separated by a
# dash.") or a fragment ("5308 in words.") is not an instruction, whatever the answer.
REQUEST_VERBS = (
    "write|spell|give|read|name|say|list|convert|turn|put|sort|rewrite|reverse|change|express"
    "|tell|show|state|arrange|order|compute|add|calculate|find|print|type|transform|make"
    "|capitali[sz]e|alphabeti[sz]e|return|output|provide|translate|render|format"
)
_REQUEST = re.compile(
    rf"^\W*(?:please,?\s+)?(?:(?:can|could|would|will)\s+you\s+)?(?:{REQUEST_VERBS})\b", re.I
)
_DATE = re.compile(r"(?<![\d-])(\d{4})-(\d{2})-(\d{2})(?![\d-])")
_TIME = re.compile(r"(?<![\d:])([01]\d|2[0-3]):([0-5]\d)(?![\d:])")
_NUMBER = re.compile(r"(?<![\w:-])(?<!\d\.)\d+(?![\w:-]|\.\d)")  # not in a time, date, decimal


@dataclass(frozen=True)
class Verdict:
    """``accepted``; the verified answer (``None`` when rejected); why, in a few words."""

    accepted: bool
    answer: str | None
    reason: str
    key: tuple = field(default=(), compare=False)  # the parsed task input, for the leakage check


def _reject(reason: str) -> Verdict:
    return Verdict(False, None, reason)


def _word_run(text: str, vocabulary: set[str]) -> list[list[str]]:
    """The runs of >= 2 consecutive vocabulary words in ``text`` (the family's inputs)."""
    runs, run = [], []
    for token in re.findall(r"[A-Za-z]+", text) + [""]:
        if token in vocabulary:
            run.append(token)
            continue
        if len(run) >= 2:
            runs.append(run)
        run = []
    return runs


def parse_input(task: str, instruction: str, spec: Mapping) -> tuple[str, tuple] | str:
    """``(answer, key)`` recomputed from the input found in ``instruction``, or why not (str)."""
    if task == "date":
        found = _DATE.findall(instruction)
        if len(found) != 1:
            return f"{len(found)} ISO dates"
        y, m, d = map(int, found[0])
        try:
            datetime.date(y, m, d)
        except ValueError:
            return "not a calendar date"
        return f"{d} {spec['months'][m - 1]} {y}", (y, m, d)
    if task == "time":
        found = _TIME.findall(instruction)
        if len(found) != 1 or len(re.findall(r"\d+:\d+", instruction)) != 1:
            return f"{len(found)} hh:mm times"
        h, m = map(int, found[0])
        return f"{(h - 1) % 12 + 1}:{m:02d} {'am' if h < 12 else 'pm'}", (h, m)
    numbers = _NUMBER.findall(instruction)
    if task == "digits":
        if len(numbers) != 1 or len(numbers[0]) > 12:
            return f"{len(numbers)} numbers"
        return " ".join(spec["names"][int(c)] for c in numbers[0]), (numbers[0],)
    if task == "add":
        if len(numbers) != 2:
            return f"{len(numbers)} numbers, not 2"
        a, b = map(int, numbers)
        return str(a + b), (a, b)
    if task in WORD_TASKS:
        runs = _word_run(instruction, set(spec["words"]))
        if len(runs) != 1:
            return f"{len(runs)} runs of the task's words"
        words = runs[0]
        if len(set(words)) != len(words):
            return "a repeated word"
        if task == "reverse":
            return " ".join(words[::-1]), tuple(words)
        if task == "sort":  # any order of one set has one answer: the set is the input
            return " ".join(sorted(words)), tuple(sorted(words))
        return " ".join(w.upper() for w in words), tuple(words)
    return f"no checker for task {task!r}"


def verify(task: str, instruction: str, answer: str | None, specs: Mapping) -> Verdict:
    """Accept ``instruction`` for ``task`` when its input parses, its wording keeps the task's
    meaning, and ``answer`` (if given) equals the recomputed one; the verdict carries that one."""
    if task not in specs or task not in MEANING:
        return _reject(f"unknown task {task!r}")
    if not isinstance(instruction, str) or not instruction.strip():
        return _reject("empty instruction")
    if len(instruction) > 200 or "\n" in instruction.strip():
        return _reject("too long")
    if not re.search(MEANING[task], instruction, re.I):
        return _reject("meaning lost")
    if not asks(instruction):
        return _reject("not a request")
    if task in WORD_TASKS and any(
        re.search(MEANING[other], instruction, re.I) for other in WORD_TASKS if other != task
    ):
        return _reject("ambiguous task")
    parsed = parse_input(task, instruction, specs[task])
    if isinstance(parsed, str):
        return _reject(f"no input ({parsed})")
    expected, key = parsed
    if expected in instruction:  # e.g. words already in order: a copy, as the seed set rejects
        return _reject("answer copied")
    if answer is not None and answer.strip() != expected:
        return _reject("wrong answer")
    return Verdict(True, expected, "accepted", (task, *key))


def asks(instruction: str) -> bool:
    """Whether ``instruction`` is worded as a request: an instruction verb first, or a question."""
    return bool(_REQUEST.match(instruction)) or instruction.rstrip().endswith("?")


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = normalise(text).split()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class HeldOut:
    """The evaluation items a synthetic example must not reproduce (exact, input or n-gram)."""

    instructions: set[str]
    keys: set[tuple]
    rare_ngrams: set[tuple[str, ...]]
    n: int = 3

    @classmethod
    def of(cls, *splits: Iterable[Mapping], specs: Mapping | None = None, n: int = 3) -> HeldOut:
        """From rows with ``task`` and ``instruction`` (e.g. the validation and test splits)."""
        from lmref.data.instruction_tasks import TASK_SPECS

        specs = specs or TASK_SPECS
        rows = [r for split in splits for r in split]
        counts = Counter(g for r in rows for g in ngrams(r["instruction"], n))
        keys = set()
        for r in rows:
            parsed = parse_input(r["task"], r["instruction"], specs.get(r["task"], {}))
            if not isinstance(parsed, str):
                keys.add((r["task"], *parsed[1]))
        return cls(
            instructions={normalise(r["instruction"]) for r in rows},
            keys=keys,
            rare_ngrams={g for g, c in counts.items() if c == 1},
            n=n,
        )

    def leak(self, instruction: str, key: tuple = ()) -> str | None:
        """``"exact"``, ``"input"`` or ``"n-gram"`` when ``instruction`` (with its parsed ``key``
        from :func:`verify`) reproduces a held-out item; ``None`` when it is clean."""
        if normalise(instruction) in self.instructions:
            return "exact"
        if key and key in self.keys:
            return "input"
        if ngrams(instruction, self.n) & self.rare_ngrams:
            return "n-gram"
        return None
