"""The corpus pipeline at scale: clean, exact dedup, near dedup, filter and split as a stream over
sharded files on disk, with an on-disk dedup index, so memory stays bounded whatever the corpus size.

``lmref.data.pipeline.prepare_data`` holds the whole corpus in RAM: right for the notebook's
2 MB, wrong for 2 GB. Here the per-document functions of ``lmref.data.clean`` run on one
document at a time from JSONL / Parquet / text shards, kept ones go to sharded Parquet per split.
What is remembered across documents lives in one SQLite file (``lmref.data.disk_dedup``): 16
bytes of SHA-256 per distinct document and, per document kept, its LSH band keys and signature.
SQLite's page cache is capped (``sqlite_cache_mb``), the Parquet writers buffer ``batch_rows``
rows or ``batch_mb``, and the process's peak RSS is checked against ``max_rss_mb``.

Why plain generators and not ``datasets`` streaming or ``num_proc``: dedup keeps the *first*
occurrence, so it needs one ordered pass with one shared index; on 2 cores there is no
parallelism to win. The per-document steps (``lmref.data.text_rules``) are compiled regexes and
C string methods, not per-character loops. The RSS growth is SQLite's cache plus a row group
as Arrow encodes it, whatever the corpus size.

On more than one machine: clean and filter are per document, so shards split across tasks;
dedup needs a global view. HF ``datatrove`` does it in stages (signatures per task -> buckets
per band -> clusters -> filter), each parallel, on a laptop, Slurm or Ray. With this module,
shard by the LSH band key (``key % n == rank``) or dedup across sources with datatrove.
Recommendation (``benchmarks/results/data_scale-cpu.json``, 300 MB: this path 418 s, datatrove
with one task 535 s, RSS growth 23 MB): this path on one machine up to a few GB (~0.7 MB/s a
core, 1 GB in ~25 min); datatrove beyond, as its stages spread over tasks and machines.

Usage::

    from lmref.data.stream import StreamConfig, stream_corpus

    report = stream_corpus(["corpus/"], "out/", StreamConfig(max_rss_mb=1024))
    report["steps"]["near"]["docs_per_s"], report["peak_rss_mb"], report["shards"]["train"]
    # out/train/part-00000.parquet ...; datasets.load_dataset("parquet", data_dir="out/train")
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmref.data.clean import CleanConfig, FilterConfig, _quality_reason, clean_text, split_of
from lmref.data.decontaminate import NgramIndex, item_ngrams
from lmref.data.disk_dedup import DiskDedupIndex
from lmref.data.language import DEFAULT_LANGUAGES, UNDETERMINED, language_detector
from lmref.data.pii import mask_pii
from lmref.data.shards import ShardWriter, warm_up_parquet
from lmref.data.sources import TEXT_SUFFIXES, Document
from lmref.data.text_rules import warm_up as warm_up_text_rules

SPLITS = ("train", "validation", "test")
STEPS = ("read", "clean", "language", "exact", "near", "filter", "pii", "decontaminate", "write")


@dataclass
class StreamConfig:
    """Knobs of :func:`stream_corpus`; the step settings mean what they mean in ``clean.py``."""

    clean: CleanConfig = field(default_factory=CleanConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    near_duplicates: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle_size: int = 5
    seed: int = 1
    max_shingle_chars: int | None = 100_000
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    salt: str = "lmref"
    text_key: str = "text"
    rows_per_shard: int = 100_000  # rows per output Parquet file
    batch_rows: int = 2_000  # rows buffered before a Parquet row group is written
    batch_mb: float = 1.0  # ... or fewer: 2,000 rows of 3 KB added ~30 MB to the peak in Arrow
    sqlite_cache_mb: int = 8  # in RSS; the rest of the index is in the OS page cache, not RSS
    commit_every: int = 20_000  # documents per SQLite transaction
    max_rss_mb: float | None = 2_048  # the process's peak RSS cap; None: measure only
    keep_index: bool = False  # keep out_dir/dedup_index.sqlite (to add more shards later)
    mask_pii: bool = True  # as prepare_data: e-mail, phone, IDs, IPs, cards, keys -> <TYPE>
    # Off by default here (on in prepare_data): lingua loads a model per candidate language at
    # its first document, tens of MB of RSS the memory cap then has to allow for.
    detect_language: bool = False
    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    decontaminate_n: int = 13  # n-gram size when stream_corpus gets eval_texts

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.val_fraction < 0 or self.test_fraction < 0:
            raise ValueError("val_fraction and test_fraction must be >= 0")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        if self.rows_per_shard < 1 or self.batch_rows < 1:
            raise ValueError("rows_per_shard and batch_rows must be >= 1")
        if self.batch_mb <= 0 or self.sqlite_cache_mb < 1:
            raise ValueError("batch_mb must be > 0 and sqlite_cache_mb >= 1")


def peak_rss_mb() -> float:
    """This process's resident high-water mark in MB (Linux ``VmHWM``; 0.0 where there is none).

    Not ``lmref.core.memory.PeakMemory``: it imports torch, hundreds of MB in a data process."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


# ----------------------------------------------------------------------------------------------
# Input: sharded JSONL (optionally .gz), Parquet, or text files, one document at a time
# ----------------------------------------------------------------------------------------------


def corpus_files(paths: Iterable[str | Path]) -> list[Path]:
    """The input files, folders expanded in sorted order (the order dedup keeps the first of)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
        elif p.is_file():
            if not _kind(p):
                raise ValueError(f"{p}: not .jsonl, .jsonl.gz, .parquet or {TEXT_SUFFIXES}")
            files.append(p)
        else:
            raise FileNotFoundError(f"no such corpus file or folder: {p}")
    if not files:
        raise ValueError(f"no .jsonl, .jsonl.gz, .parquet or text file under {list(paths)}")
    return files


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text" if path.suffix.lower() in TEXT_SUFFIXES else None


def iter_documents(paths: Iterable[str | Path], text_key: str = "text") -> Iterator[Document]:
    """Documents one at a time; ``source`` is ``file:line`` (JSONL), ``file:row`` (Parquet) or the
    file (text). A JSONL line that is not an object with a string ``text_key`` is an error naming
    the file and line."""
    for f in corpus_files(paths):
        kind = _kind(f)
        if kind == "text":
            yield Document(f.read_text(encoding="utf-8", errors="replace"), str(f))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1_000, columns=[text_key]):
                for text in batch.column(0).to_pylist():
                    yield Document(text or "", f"{f}:{row}")
                    row += 1
        else:
            opener = gzip.open if f.name.lower().endswith(".gz") else open
            with opener(f, "rt", encoding="utf-8", errors="replace") as lines:
                for n, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f}:{n}: not a JSON line ({e})") from None
                    text = record.get(text_key) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{f}:{n}: no string field {text_key!r}")
                    yield Document(text, f"{f}:{n}")


# ----------------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------------


class _Step:
    """Time, documents and UTF-8 bytes in of one step, summed over the stream."""

    def __init__(self) -> None:
        self.seconds, self.docs_in, self.docs_out, self.bytes_in = 0.0, 0, 0, 0

    def report(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "mb_in": round(self.bytes_in / 1e6, 3),
            "seconds": round(self.seconds, 3),
            "docs_per_s": round(self.docs_in / s, 1),
            "mb_per_s": round(self.bytes_in / 1e6 / s, 3),
        }


def stream_corpus(
    paths: Iterable[str | Path] | str | Path,
    out_dir: str | Path,
    config: StreamConfig | None = None,
    eval_texts: Sequence[str] = (),
) -> dict:
    """Clean -> (language) -> exact dedup -> near dedup -> filter -> PII -> split ->
    decontaminate over ``paths``, one document at a time; kept documents go to
    ``out_dir/<split>/part-*.parquet``, every dropped duplicate to ``out_dir/duplicates.jsonl``
    (``{"source", "kind", "of"}``), the report to ``out_dir/report.json``. A training document
    holding an n-gram of one of ``eval_texts`` is dropped (the stream's own validation and test
    documents are not checked against: unlike prepare_data's, they are not all known before the
    training ones). Raises ``MemoryError`` naming the cap when the peak RSS passes
    ``config.max_rss_mb`` (what was written so far stays on disk)."""
    import pyarrow as pa

    # Arrow's default pool (mimalloc) keeps freed row groups (RSS growth 25 vs 18 MB on 9 MB)
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        return _stream_corpus(paths, out_dir, config or StreamConfig(), eval_texts)
    finally:
        pa.set_memory_pool(previous)


def _stream_corpus(
    paths: Iterable[str | Path] | str | Path,
    out_dir: str | Path,
    config: StreamConfig,
    eval_texts: Sequence[str],
) -> dict:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "dedup_index.sqlite"
    index_path.unlink(missing_ok=True)
    index = DiskDedupIndex(index_path, config)
    warm_up_parquet()
    warm_up_text_rules()  # its Unicode tables: a one-off few MB, before the RSS at start
    writers = {
        s: ShardWriter(out / s, config.rows_per_shard, config.batch_rows, config.batch_mb)
        for s in SPLITS
    }
    removed: Counter = Counter()
    clean_counts: Counter = Counter()
    pii: Counter = Counter()
    languages: dict[str, Counter] = {"in": Counter(), "out": Counter()}
    detector = language_detector(config.languages) if config.detect_language else None
    # As lmref.data.decontaminate: items of fewer than 8 units are not checked.
    grams = [item_ngrams(t, config.decontaminate_n) for t in eval_texts]
    contamination = NgramIndex([g if len(next(iter(g), ())) >= 8 else set() for g in grams])
    # The steps in the order a document meets them; the optional ones only when they run
    running = {
        "language": detector is not None,
        "pii": config.mask_pii,
        "decontaminate": bool(contamination.items),
    }
    steps = {name: _Step() for name in STEPS if running.get(name, True)}
    rss_start, clock = peak_rss_mb(), time.perf_counter
    started = clock()
    docs = iter_documents(paths, config.text_key)
    with open(out / "duplicates.jsonl", "w", encoding="utf-8") as dup_log:
        n = 0
        while True:
            t0 = clock()
            doc = next(docs, None)
            t1 = clock()
            steps["read"].seconds += t1 - t0
            if doc is None:
                break
            n += 1
            size = len(doc.text.encode("utf-8", "surrogatepass"))
            _count(steps["read"], size, True)
            text, counts = clean_text(doc.text, config.clean)
            clean_counts.update(counts)
            t2 = clock()
            _count(steps["clean"], size, bool(text), t2 - t1)
            if not text:
                removed["empty_after_clean"] += 1
                continue
            size = len(text.encode("utf-8", "surrogatepass"))
            language = UNDETERMINED
            if detector is not None:
                found = detector.detect_language_of(text)
                language = found.iso_code_639_1.name.lower() if found else UNDETERMINED
                t2, t = clock(), t2
                _count(steps["language"], size, True, t2 - t)
            languages["in"][language] += 1
            duplicate = index.is_exact_duplicate(text)
            t3 = clock()
            _count(steps["exact"], size, not duplicate, t3 - t2)
            if duplicate:
                dup_log.write(json.dumps({"source": doc.source, "kind": "exact"}) + "\n")
                continue
            if config.near_duplicates:
                sig = index.signature(text)
                match = index.near_match(sig)
                if match is None:
                    index.add(n, doc.source, sig)
                t4 = clock()
                _count(steps["near"], size, match is None, t4 - t3)
                if match is not None:
                    dup_log.write(
                        json.dumps({"source": doc.source, "kind": "near", "of": match}) + "\n"
                    )
                    continue
                t3 = t4
            reason = _quality_reason(text, config.filters)
            t5 = clock()
            _count(steps["filter"], size, reason is None, t5 - t3)
            if reason:
                removed[reason] += 1
                continue
            if config.mask_pii:
                text, found_pii = mask_pii(text)
                pii.update(found_pii)
                pii["docs_touched"] += bool(found_pii)
                t5, t = clock(), t5
                _count(steps["pii"], size, True, t5 - t)
            split = split_of(text, config.val_fraction, config.test_fraction, config.salt)
            if split == "train" and contamination.items:
                hit = contamination.find(text)
                t5, t = clock(), t5
                _count(steps["decontaminate"], size, not hit, t5 - t)
                if hit:
                    removed["contaminated"] += 1
                    continue
            languages["out"][language] += 1
            writers[split].write(Document(text, doc.source, language=language))
            _count(steps["write"], size, True, clock() - t5)
            if n % 1_000 == 0:
                _check_rss(config.max_rss_mb)
    t6 = clock()
    shards = {s: w.close() for s, w in writers.items()}
    steps["write"].seconds += clock() - t6
    index_bytes = index.close()
    if not config.keep_index:
        index_path.unlink()
    _check_rss(config.max_rss_mb)
    exact, near = steps["exact"], steps["near"]
    report = {
        "docs_in": steps["read"].docs_in,
        "docs_out": {s: w.rows for s, w in writers.items()},
        "exact_duplicates": exact.docs_in - exact.docs_out,
        "near_duplicates": near.docs_in - near.docs_out,
        "removed": dict(sorted(removed.items())),
        "clean": dict(clean_counts),
        "pii": dict(pii),
        "languages": {k: dict(v.most_common()) for k, v in languages.items()} if detector else None,
        "eval_items": len(eval_texts),
        "steps": {k: v.report() for k, v in steps.items()},
        "seconds": round(clock() - started, 3),
        "mb_in": round(steps["read"].bytes_in / 1e6, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_at_start_mb": round(rss_start, 1),  # imports and index open
        "rss_growth_mb": round(peak_rss_mb() - rss_start, 1),
        "index_bytes": index_bytes,
        "index_bytes_per_doc": round(index_bytes / max(exact.docs_in, 1), 1),
        "lsh": {"bands": index.bands, "rows": index.rows},
        "shards": shards,
        "config": asdict(config),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _count(step: _Step, size: int, kept: bool, seconds: float = 0.0) -> None:
    step.seconds += seconds
    step.docs_in += 1
    step.docs_out += kept
    step.bytes_in += size


def _check_rss(cap_mb: float | None) -> None:
    peak = peak_rss_mb()
    if cap_mb is not None and peak > cap_mb:
        raise MemoryError(
            f"peak RSS {peak:.0f} MB passed StreamConfig.max_rss_mb={cap_mb:.0f}: lower "
            "sqlite_cache_mb, batch_rows or max_shingle_chars, or raise the cap"
        )
