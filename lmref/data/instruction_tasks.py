"""The instruction set's tasks: templates, their vocabularies, and one example drawn from a spec.

Each task (dates in words, 12-hour time, digits spelled out, reversing / sorting / upper-casing
words, addition) turns an input into a short answer that is not a copy of it. The table is data:
``data/instruction_tasks.json`` is a copy of it (a test keeps them equal), and an edited copy can
replace it (``InstructionConfig.task_specs_path``); a spec missing a field is named in the error.

Usage::

    import random
    from lmref.data.instruction_tasks import TASK_SPECS, checked_example

    checked_example("time", TASK_SPECS["time"], random.Random(0), 0, "TASK_SPECS")
    # ('Write 12:48 in 12-hour time.', '12:48 pm')
"""

from __future__ import annotations

import random

# Templated tasks whose answers are short, exactly checkable and need a transformation of the input
# (not a copy of a span of it). data/instruction_tasks.json is a copy of this table (a test keeps
# them equal); InstructionConfig.task_specs_path loads an edited one.
TASK_SPECS: dict[str, dict] = {
    "date": {
        "template": "Write the date {iso} in words.",
        "months": [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ],
        "years": [1950, 2049],
        "days": [1, 28],
    },
    "time": {
        "template": "Write {hhmm} in 12-hour time.",
    },
    "digits": {
        "template": "Spell out the digits of {number}.",
        "names": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
        "lengths": [3, 4],
    },
    "reverse": {
        "template": "Reverse the order of the words: {words}",
        "words": [
            "file",
            "list",
            "string",
            "value",
            "name",
            "type",
            "object",
            "error",
            "data",
            "line",
            "path",
            "time",
            "key",
            "module",
            "class",
            "text",
            "word",
            "code",
            "node",
            "user",
            "host",
            "port",
            "mode",
            "size",
        ],
        "lengths": [3, 4],
    },
    "sort": {
        "template": "Sort the words alphabetically: {words}",
        "words": [
            "apple",
            "bread",
            "cheese",
            "dates",
            "eggs",
            "flour",
            "grapes",
            "honey",
            "jam",
            "lemon",
            "milk",
            "nuts",
            "olives",
            "pears",
            "rice",
            "salt",
        ],
        "lengths": [3],
    },
    "add": {
        "template": "What is {a} plus {b}?",
        "a": [10, 99],
        "b": [1, 9],
    },
    "uppercase": {
        "template": "Write in capital letters: {words}",
        "words": [
            "red",
            "name",
            "default",
            "time",
            "text",
            "test",
            "node",
            "user",
            "port",
            "lock",
            "state",
            "read",
            "send",
            "run",
            "load",
        ],
        "lengths": [2, 3],
    },
}


# The fields each task reads from its spec; an edited spec missing one is named in the error.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "date": ("template", "months", "years", "days"),
    "time": ("template",),
    "digits": ("template", "names", "lengths"),
    "reverse": ("template", "words", "lengths"),
    "sort": ("template", "words", "lengths"),
    "add": ("template", "a", "b"),
    "uppercase": ("template", "words", "lengths"),
}


def _task_example(task: str, spec: dict, rng: random.Random) -> tuple[str, str]:
    t = spec["template"]
    if task == "date":
        y, m, d = rng.randint(*spec["years"]), rng.randint(1, 12), rng.randint(*spec["days"])
        return t.format(iso=f"{y:04d}-{m:02d}-{d:02d}"), f"{d} {spec['months'][m - 1]} {y}"
    if task == "time":
        h, m = rng.randint(0, 23), rng.randint(0, 59)
        return t.format(
            hhmm=f"{h:02d}:{m:02d}"
        ), f"{(h - 1) % 12 + 1}:{m:02d} {'am' if h < 12 else 'pm'}"
    if task == "digits":
        digits = [rng.randint(1, 9)] + [
            rng.randint(0, 9) for _ in range(rng.choice(spec["lengths"]) - 1)
        ]
        number = "".join(map(str, digits))
        return t.format(number=number), " ".join(spec["names"][d] for d in digits)
    if task in ("reverse", "sort", "uppercase"):
        words = rng.sample(spec["words"], rng.choice(spec["lengths"]))
        answer = {
            "reverse": lambda w: w[::-1],
            "sort": sorted,
            "uppercase": lambda w: [x.upper() for x in w],
        }[task](words)
        return t.format(words=" ".join(words)), " ".join(answer)
    if task == "add":
        a, b = rng.randint(*spec["a"]), rng.randint(*spec["b"])
        return t.format(a=a, b=b), str(a + b)
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_SPECS)}")


def checked_example(
    task: str, spec: dict, rng: random.Random, n: int, where: str
) -> tuple[str, str]:
    """``_task_example`` with an error that names the task, the example and the field."""
    missing = [f for f in TASK_FIELDS.get(task, ()) if spec.get(f) is None]
    if missing:
        raise ValueError(
            f"task {task!r} in {where}: example {n} needs the field {missing[0]!r}, "
            f"which the spec lacks (or is null); the task reads {list(TASK_FIELDS[task])}"
        )
    try:
        return _task_example(task, spec, rng)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith("unknown task"):
            raise
        field = f"field {e.args[0]!r}" if isinstance(e, KeyError) else "a field"
        raise ValueError(
            f"task {task!r} in {where}: example {n} failed on {field} of the spec "
            f"({type(e).__name__}: {e}); check its values against TASK_SPECS"
        ) from e
