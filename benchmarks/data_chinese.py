"""Chinese beside English in the data pipeline: language detection speed, counts per step, and
characters per token per language for the course's tokenizer against SmolLM2's.

1. Detection: ``lingua`` over a sample of the mix (stdlib docstrings + Debian's fortunes-zh),
   one document at a time and in parallel, high- vs low-accuracy mode: documents per second
   (median and range over repeats) and how often the two modes agree.
2. The mix through every step (language, clean, dedup, filter, split), counts per language.
3. Characters per token on the validation split, per language: a 4096-token BPE trained on the
   mix's train split, the same trained on its English documents only, and SmolLM2-135M's 49k
   tokenizer (``artifacts/smollm2-135m-instruct``).

    python benchmarks/data_chinese.py    # writes benchmarks/results/data_chinese-cpu.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from lmref.core.stats import Spread
from lmref.data.language import DEFAULT_LANGUAGES, language_detector
from lmref.data.pipeline import (
    chars_per_token,
    clean_documents,
    deduplicate,
    detect_languages,
    filter_documents,
    load_mix,
    split_documents,
    texts_by_language,
    train_tokenizer,
)
from lmref.lab.env import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "artifacts/smollm2-135m-instruct"


def detection_speed(texts: list[str], repeats: int = 3) -> dict:
    out = {}
    for low in (False, True):
        detector = language_detector(DEFAULT_LANGUAGES, low)
        detector.detect_language_of(texts[0])  # loads the models outside the timing
        serial, parallel = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            found = [detector.detect_language_of(t) for t in texts]
            serial.append(len(texts) / (time.perf_counter() - start))
            start = time.perf_counter()
            detector.detect_languages_in_parallel_of(texts)
            parallel.append(len(texts) / (time.perf_counter() - start))
        out["low_accuracy" if low else "high_accuracy"] = {
            "docs_per_s_serial": asdict(Spread.of(serial)),
            "docs_per_s_parallel": asdict(Spread.of(parallel)),
            "found": [str(f) for f in found],
        }
    high, low = out["high_accuracy"].pop("found"), out["low_accuracy"].pop("found")
    out["agreement_low_vs_high"] = sum(a == b for a, b in zip(high, low)) / len(texts)
    return out


def main() -> None:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    docs, source = load_mix(["stdlib", "zh-fortunes"])
    sample = [d.text for d in docs[::8]]
    result = {
        "cpu": cpu_model(),
        "settings": {"sources": ["stdlib", "zh-fortunes"], "languages": list(DEFAULT_LANGUAGES)},
        "source": {k: v["docs"] for k, v in source["sources"].items()},
        "detection": {"sample_docs": len(sample), **detection_speed(sample)},
        "steps": {},
        "seconds": {},
    }
    steps = {
        "language": detect_languages,
        "clean": clean_documents,
        "dedup": deduplicate,
        "filter": filter_documents,
    }
    for name, step in steps.items():
        start = time.perf_counter()
        docs, stats = step(docs)
        result["seconds"][name] = round(time.perf_counter() - start, 2)
        result["steps"][name] = {"languages": stats["languages"]} | {
            k: stats[k] for k in ("removed", "near_duplicates", "exact_duplicates") if k in stats
        }
    splits, stats = split_documents(docs)
    result["steps"]["split"] = stats["languages"]
    train, held_out = splits["train"], texts_by_language(splits["validation"])
    start = time.perf_counter()
    mix_tok, _ = train_tokenizer([d.text for d in train], vocab_size=4096)
    en_tok, _ = train_tokenizer([d.text for d in train if d.language == "en"], vocab_size=4096)
    result["seconds"]["tokenizers"] = round(time.perf_counter() - start, 2)
    result["validation_chars_per_token"] = {
        "bpe4096_mix": chars_per_token(mix_tok, held_out),
        "bpe4096_english_only": chars_per_token(en_tok, held_out),
        "smollm2_49k": chars_per_token(AutoTokenizer.from_pretrained(MODEL), held_out),
    }
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    result["note"] = (
        "2 CPU cores shared with other jobs: speeds are indicative. Detection runs once per "
        "document after loading; counts per language come from Document.language."
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_chinese-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
