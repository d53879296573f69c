"""What tool calling gets from SmolLM2-135M-Instruct on a CPU: ``auto`` vs ``required``.

One lmref server (``artifacts/smollm2-135m-instruct``, one torch thread); 12 arithmetic questions
that need the ``add`` or the ``multiply`` tool, each asked with ``tool_choice`` "auto" (the model
chooses: text or a call, parsed after) and "required" (a grammar forces a call). Per mode: the
rate of answers that are a well-formed call whose arguments validate against the schema, the
rate that picked the right tool (each a Wilson interval), and the latency per request (median
and range).

    python benchmarks/tool_calls.py     # writes benchmarks/results/tool_calls-cpu.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "artifacts/smollm2-135m-instruct"
PAIR = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {"type": "function", "function": {"name": n, "description": d, "parameters": PAIR}}
    for n, d in (("add", "Add two integers"), ("multiply", "Multiply two integers"))
]
QUESTIONS = [
    (f"What is {a} {word} {b}?", tool)
    for a, b in ((3, 4), (12, 7), (25, 5), (8, 9), (41, 2), (6, 6))
    for word, tool in (("plus", "add"), ("times", "multiply"))
]


def start_smol():
    """The server both tool benchmarks measure (``tool_stream.py`` too): SmolLM2 as ``smol``, 8
    rows a batch, no response cache, one torch thread; (its handle, an openai client on it)."""
    import openai

    from lmref.serve import start_server
    from lmref.serving.app import ModelSpec, ServingConfig

    config = ServingConfig(
        models=[ModelSpec("smol", MODEL, max_batch_size=8)],
        api_keys=[],
        cache_size=0,
        torch_threads=1,
    )
    handle = start_server(config)
    client = openai.OpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0, timeout=120)
    return handle, client


def main() -> None:
    import jsonschema

    from lmref.core.stats import Score, Spread
    from lmref.lab.env import cpu_model

    handle, client = start_smol()
    client.chat.completions.create(  # warm-up: llguidance's tokenizer view is built once
        model="smol",
        messages=[{"role": "user", "content": "hi"}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=30,
    )
    modes = {}
    try:
        for mode in ("auto", "required"):
            valid, right, seconds = 0, 0, []
            for k, (question, tool) in enumerate(QUESTIONS):
                start = time.perf_counter()
                reply = client.chat.completions.create(
                    model="smol",
                    messages=[{"role": "user", "content": question}],
                    tools=TOOLS,
                    tool_choice=mode,
                    parallel_tool_calls=False,
                    temperature=0.7,
                    seed=k,
                    max_tokens=40,
                )
                seconds.append(time.perf_counter() - start)
                calls = reply.choices[0].message.tool_calls or []
                if calls:
                    try:
                        jsonschema.validate(json.loads(calls[0].function.arguments), PAIR)
                        valid += 1
                        right += calls[0].function.name == tool
                    except (ValueError, jsonschema.ValidationError):
                        pass
            modes[mode] = {
                "valid_call": str(Score(valid, len(QUESTIONS))),
                "right_tool": str(Score(right, len(QUESTIONS))),
                "latency_s": str(Spread.of(seconds)),
            }
    finally:
        handle.stop(drain_timeout=5)
    result = {
        "device": cpu_model(),
        "settings": {
            "model": MODEL,
            "questions": len(QUESTIONS),
            "temperature": 0.7,
            "max_tokens": 40,
            "torch_threads": 1,
            "parallel_tool_calls": False,
        },
        "results": modes,
        "note": "auto: the model may answer in text (a 135M model mostly does); required: a "
        "grammar (lmref.serving.tool_calls) forces a well-formed call, the tool's choice and "
        "argument values are still the model's. Noisy 2-core machine shared with other jobs.",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tool_calls-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
