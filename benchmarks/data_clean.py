"""What PII masking and decontamination cost and find on the course's default corpus, on a CPU.

The standard library's docstrings (cleaned, deduplicated, filtered as ``prepare_data`` does):
PII masking's speed (median and range of 3 repeats) and what it masked; decontamination of the
training split against the held-out splits and the instruction set's validation and test items
(13-grams), its speed and what it removed.

    python benchmarks/data_clean.py    # writes benchmarks/results/data_clean-cpu.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmref.core.stats import Spread
from lmref.lab.env import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeats: int = 3) -> tuple[Spread, object]:
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return Spread.of(seconds), out


def main() -> None:
    from lmref.data.decontaminate import decontaminate
    from lmref.data.instructions import InstructionConfig, make_instruction_dataset
    from lmref.data.pii import mask_documents
    from lmref.data.pipeline import (
        clean_documents,
        deduplicate,
        filter_documents,
        load_stdlib_docstrings,
        split_documents,
    )

    docs, _ = load_stdlib_docstrings()
    docs, _ = clean_documents(docs)
    docs, _ = deduplicate(docs)
    docs, _ = filter_documents(docs)
    chars = sum(len(d.text) for d in docs)
    pii_s, (docs, pii) = timed(lambda: mask_documents(docs))
    splits, _ = split_documents(docs)
    raw, _ = make_instruction_dataset(InstructionConfig())
    items = [f"{r['instruction']} {r['answer']}" for k in ("validation", "test") for r in raw[k]]
    held = [d.text for k in ("validation", "test") for d in splits[k]]
    dec_s, (_, dec) = timed(lambda: decontaminate(splits["train"], held + items))
    result = {
        "cpu": cpu_model(),
        "settings": {"corpus": "stdlib docstrings", "docs": len(docs), "chars": chars, "n": 13},
        "results": {
            "pii_seconds": str(pii_s),
            "pii_mb_per_s": round(chars / 1e6 / pii_s.median, 2),
            "pii": pii,
            "decontaminate_seconds": str(dec_s),
            "decontaminate": dec,
        },
        "note": "the masked IPs of the stdlib are version strings and documentation examples "
        "(regexes, not NER: see lmref.data.pii); the removed training documents are docstrings "
        "repeated across modules (_pyio/io, _pydecimal/decimal) whose copy fell in a held-out split",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_clean-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
