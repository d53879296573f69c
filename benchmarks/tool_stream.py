"""When a streamed tool call reaches the client: its header and arguments as generated, on a CPU.

One lmref server (``artifacts/smollm2-135m-instruct``, one torch thread); 12 arithmetic questions
asked with ``tool_choice`` "required" (a grammar forces an ``add`` or ``multiply`` call), each
twice at temperature 0: streamed, timing every chunk, and not streamed. Per question: when the
call's header (id and name) arrived and when the choice finished (seconds from the request,
median and range), how many argument fragments came, and whether the openai client's
accumulated call equals the non-streamed one exactly (a Wilson interval). Before #27's
streaming, the header came with the finishing chunk, in one burst.

    python benchmarks/tool_stream.py     # writes benchmarks/results/tool_stream-cpu.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    # The same server, tools and questions as benchmarks/tool_calls.py (run as a script, this
    # folder is on sys.path).
    from tool_calls import MODEL, QUESTIONS, TOOLS, start_smol

    from lmref.core.stats import Score, Spread
    from lmref.lab.env import cpu_model

    handle, client = start_smol()
    questions = [question for question, _ in QUESTIONS]
    header_s, finish_s, share, fragments, equal = [], [], [], [], 0
    try:
        for k, question in enumerate([questions[0], *questions]):  # the first one warms up
            settings = dict(
                model="smol",
                messages=[{"role": "user", "content": question}],
                tools=TOOLS,
                tool_choice="required",
                parallel_tool_calls=False,
                temperature=0,
                max_tokens=40,
            )
            start, header, pieces = time.perf_counter(), None, 0
            with client.chat.completions.stream(**settings) as stream:
                for event in stream:
                    if event.type != "chunk" or not event.chunk.choices:
                        continue
                    deltas = event.chunk.choices[0].delta.tool_calls or []
                    if deltas and header is None:
                        header = time.perf_counter() - start
                    pieces += sum(bool(d.function.arguments) for d in deltas)
                streamed = stream.get_final_completion().choices[0].message.tool_calls
            end = time.perf_counter() - start
            whole = client.chat.completions.create(**settings).choices[0].message.tool_calls
            if k == 0:
                continue
            header_s.append(header)
            finish_s.append(end)
            share.append(header / end)
            fragments.append(pieces)
            equal += [(c.function.name, c.function.arguments) for c in streamed] == [
                (c.function.name, c.function.arguments) for c in whole
            ]
    finally:
        handle.stop(drain_timeout=5)
    result = {
        "device": cpu_model(),
        "settings": {
            "model": MODEL,
            "questions": len(QUESTIONS),
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": 40,
            "torch_threads": 1,
        },
        "results": {
            "header_arrives_s": str(Spread.of(header_s)),
            "choice_finishes_s": str(Spread.of(finish_s)),
            "header_at_share_of_stream": str(Spread.of(share)),
            "argument_fragments": str(Spread.of(fragments)),
            "streamed_equals_whole": str(Score(equal, len(QUESTIONS))),
        },
        "note": "The call's header goes out once its name is complete and '\"arguments\": {' "
        "follows; each argument fragment as its token is generated. Time from the request to "
        "the header includes the prompt's prefill and the '<tool_call>[{\"name\": ...' tokens. "
        "Noisy 2-core machine shared with other jobs.",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tool_stream-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
