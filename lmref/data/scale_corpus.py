"""A corpus of any size with planted exact and near duplicates, so dedup has a known ground truth.

Documents are drawn from a pool of paragraphs (the standard library's docstrings, cleaned, and
the Chinese fortunes of Debian's ``fortunes-zh`` when installed): each original joins random
paragraphs until it has ``min_words`` words, and is kept only when it passes the quality filter
as a whole, so every original survives cleaning and filtering unchanged. Then, with the given
rates, a document is instead a copy of an earlier original: exact (with changed whitespace,
which exact dedup normalises away) or near (one word replaced and a word appended: an estimated
Jaccard of about 0.97 on 5-word shingles, far above the 0.8 threshold). Written as JSONL shards
``shards/shard-*.jsonl`` of ``{"id", "text"}``; only the last ``window`` originals are held to copy from, so memory is bounded
at any size. The ground truth (which ``file:line`` is a duplicate of what) goes to ``truth.jsonl``.

Usage::

    from lmref.data.scale_corpus import ScaleCorpusConfig, write_scale_corpus

    truth = write_scale_corpus("corpus/", ScaleCorpusConfig(target_mb=20))
    truth["exact"], truth["near"], truth["files"]  # corpus/shards/shard-00000.jsonl, ...
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmref.data.clean import CleanConfig, FilterConfig, _quality_reason, clean_text

FORTUNES = Path("/usr/share/games/fortunes/chinese")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class ScaleCorpusConfig:
    """Size, duplicate rates and shape of the planted corpus."""

    target_mb: float = 20.0
    exact_rate: float = 0.05
    near_rate: float = 0.05
    min_words: int = 300
    docs_per_shard: int = 20_000
    window: int = 2_000  # originals held to copy duplicates from
    seed: int = 0


def paragraph_pool(fortunes: Path = FORTUNES) -> list[str]:
    """Cleaned paragraphs of the stdlib docstrings and (if present) the Chinese fortunes."""
    from lmref.data.sources import load_stdlib_docstrings

    docs, _ = load_stdlib_docstrings()
    pool = []
    for d in docs:
        text, _ = clean_text(d.text, CleanConfig())
        pool += [p for p in text.split("\n\n") if 8 <= len(p.split()) <= 200]
    if fortunes.is_file():
        raw = _ANSI.sub("", fortunes.read_text(encoding="utf-8", errors="replace"))
        for entry in raw.split("\n%\n"):
            text, _ = clean_text(entry, CleanConfig())
            # a long entry (one is a 300-word manual page) would dominate the documents that
            # draw it and make unplanted near duplicates
            if len(text) >= 20 and len(text.split()) <= 60:
                pool.append(text)
    return pool


def write_scale_corpus(out_dir: str | Path, config: ScaleCorpusConfig | None = None) -> dict:
    """Write the JSONL shards and ``truth.jsonl`` under ``out_dir``; return the counts and files."""
    config = config or ScaleCorpusConfig()
    if config.exact_rate + config.near_rate >= 1:
        raise ValueError("exact_rate + near_rate must be < 1")
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rng, pool = random.Random(config.seed), paragraph_pool()
    filters, recent = FilterConfig(), []
    counts = {"originals": 0, "exact": 0, "near": 0, "bytes": 0}
    files: list[str] = []
    target, n, shard = config.target_mb * 1e6, 0, None
    with open(out / "truth.jsonl", "w", encoding="utf-8") as truth:
        while counts["bytes"] < target:
            if n % config.docs_per_shard == 0:
                if shard:
                    shard.close()
                files.append(str(out / "shards" / f"shard-{len(files):05d}.jsonl"))
                shard = open(files[-1], "w", encoding="utf-8")
            u, kind = rng.random(), "original"
            if recent and u < config.exact_rate:
                kind, (of, text) = "exact", rng.choice(recent)
                text = text.replace("\n\n", "\n \n", 1) + "  "
            elif recent and u < config.exact_rate + config.near_rate:
                kind, (of, text) = "near", rng.choice(recent)
                words = text.split(" ")
                words[rng.randrange(len(words))] = "zyxwv"
                text = " ".join(words) + " revised"
            else:
                of, text = None, _original(rng, pool, config.min_words, filters)
            line = n % config.docs_per_shard + 1
            source = f"{files[-1]}:{line}"
            if kind == "original":
                recent.append((source, text))
                if len(recent) > config.window:
                    recent.pop(rng.randrange(len(recent)))
            else:
                truth.write(json.dumps({"source": source, "kind": kind, "of": of}) + "\n")
            counts["originals" if kind == "original" else kind] += 1
            record = json.dumps({"id": f"doc-{n:08d}", "text": text}, ensure_ascii=False)
            shard.write(record + "\n")
            counts["bytes"] += len(record.encode()) + 1
            n += 1
    if shard:
        shard.close()
    return {**counts, "docs": n, "files": files, "truth": str(out / "truth.jsonl")}


def _original(rng: random.Random, pool: list[str], min_words: int, filters: FilterConfig) -> str:
    while True:
        parts, words = [], 0
        while words < min_words:
            parts.append(rng.choice(pool))
            words += len(parts[-1].split())
        text = "\n\n".join(parts)
        if len(text) <= filters.max_chars and _quality_reason(text, filters) is None:
            return text
