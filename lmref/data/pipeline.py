"""Corpus preparation for language models: sources, cleaning, dedup, filters, split, tokenizer, packing.

Every step returns its result *and* a dict of what it did in numbers (documents in and out,
removed by reason, tokens, blocks), so a pipeline run leaves a report you can read and compare.
The default corpus needs no network: the docstrings of the running interpreter's standard library
(about 1.8 MB of English technical prose on Python 3.11). Local text files and any Hugging Face
``datasets`` dataset (when online) go through the same steps.

Where the text comes from (files, the standard library's docstrings, HF datasets) is
``lmref.data.sources``, which this module imports and re-exports (copy both). The instruction data
set (templated tasks, prompt template, loss masking, collator) is ``lmref.data.instructions``;
this module does not need it.

Usage::

    from lmref.data.pipeline import DataConfig, prepare_data, load_prepared

    report = prepare_data(DataConfig(vocab_size=4096, block_size=256), out_dir="artifacts/data")
    print(report["dedup"]["exact_duplicates"], report["packing"]["train"]["blocks"])
    tokenizer, corpus = load_prepared("artifacts/data")

Step by step (what notebook 01 does)::

    docs, stats = load_stdlib_docstrings()
    docs, stats = clean_documents(docs, CleanConfig(unicode_form="NFKC"))
    docs, stats = deduplicate(docs, threshold=0.8)
    docs, stats = filter_documents(docs, FilterConfig(min_chars=60))
    splits, stats = split_documents(docs, val_fraction=0.05, test_fraction=0.05)
    tokenizer, stats = train_tokenizer([d.text for d in splits["train"]], vocab_size=4096)
    blocks, stats = pack_blocks([d.text for d in splits["train"]], tokenizer, block_size=256)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict

from lmref.data.sources import (  # noqa: F401  (re-exported: the whole pipeline from one module)
    STDLIB_SKIP,
    TEXT_SUFFIXES,
    Document,
    load_documents,
    load_hf_dataset,
    load_stdlib_docstrings,
    load_text_files,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def _as_documents(docs: Iterable[Document | str]) -> list[Document]:
    return [
        d if isinstance(d, Document) else Document(str(d), f"doc[{i}]") for i, d in enumerate(docs)
    ]


# ----------------------------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------------------------


@dataclass
class CleanConfig:
    """What :func:`clean_documents` changes. Every switch is reported in numbers.

    unicode_form: ``"NFKC"`` folds compatibility forms (full-width letters, ligatures, non-breaking
        spaces) into plain ones; ``"NFC"`` only composes accents; ``None`` leaves text as is.
    doctest: ``"drop"`` removes interactive examples (``>>>`` lines, ``...`` continuations and
        their output), ``"prompts"`` keeps the code but strips the prompts, ``"keep"``.
    rest_markup: ``:func:`json.dumps``` -> ``json.dumps``, ``:class:`~a.B``` -> ``B``,
        ````x```` -> ``x``.
    """

    unicode_form: str | None = "NFKC"
    remove_control_chars: bool = True
    normalize_whitespace: bool = True
    doctest: str = "drop"
    rest_markup: bool = True

    def __post_init__(self) -> None:
        if self.unicode_form not in ("NFC", "NFKC", "NFD", "NFKD", None):
            raise ValueError(
                f"unicode_form must be NFC, NFKC, NFD, NFKD or None, got {self.unicode_form!r}"
            )
        if self.doctest not in ("drop", "prompts", "keep"):
            raise ValueError(f"doctest must be drop|prompts|keep, got {self.doctest!r}")


_REST_ROLE = re.compile(r":(?:[\w.+-]+:)*[\w.+-]+:`([!~]?)([^`<]*?)\s*(?:<[^`>]*>)?`")
_REST_LITERAL = re.compile(r"``(.+?)``")
_DOCTEST_PROMPT = re.compile(r"^(\s*)(>>>|\.\.\.)(?: |$)")
_EXTRA_SPACES = re.compile(r"(?<=\S) {2,}")
_BLANK_LINES = re.compile(r"\n{3,}")


def _role_text(m: re.Match) -> str:
    prefix, target = m.group(1), m.group(2)
    # reST: "~a.b.C" shows only the last component "C"
    return target.rsplit(".", 1)[-1] if prefix == "~" else target


def _strip_doctest(text: str, mode: str) -> tuple[str, int]:
    lines, out, removed, in_example = text.split("\n"), [], 0, False
    for line in lines:
        m = _DOCTEST_PROMPT.match(line)
        if mode == "prompts":
            if m:
                line = m.group(1) + line[m.end() :]
                removed += 1
            out.append(line)
            continue
        if m and m.group(2) == ">>>":
            in_example = True
        elif not line.strip():
            in_example = False  # an example (prompt + output) ends at the next blank line
        if in_example:
            removed += 1
        else:
            out.append(line)
    return "\n".join(out), removed


def clean_text(text: str, config: CleanConfig | None = None) -> tuple[str, Counter]:
    """Clean one string; return it and a Counter of what changed."""
    config = config or CleanConfig()
    counts: Counter = Counter()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if config.unicode_form:
        normalized = unicodedata.normalize(config.unicode_form, text)
        counts["unicode_normalized_docs"] += normalized != text
        text = normalized
    if config.remove_control_chars:
        # Cc (C0/C1 controls) and Cf (zero-width spaces, BOMs, soft hyphens); keep \n and \t
        kept = "".join(
            c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf")
        )
        counts["control_chars_removed"] += len(text) - len(kept)
        text = kept
    if config.doctest != "keep":
        text, n = _strip_doctest(text, config.doctest)
        counts["doctest_lines_removed"] += n
    if config.rest_markup:
        text, n_roles = _REST_ROLE.subn(_role_text, text)
        text, n_literals = _REST_LITERAL.subn(r"\1", text)
        counts["rest_markup_replaced"] += n_roles + n_literals
    if config.normalize_whitespace:
        text = "\n".join(
            re.sub(r"[^\S\n]", " ", line.expandtabs(4)).rstrip() for line in text.split("\n")
        )
        text = _BLANK_LINES.sub("\n\n", _EXTRA_SPACES.sub(" ", text)).strip()
    counts["replacement_chars"] += text.count("\ufffd")
    return text, counts


def clean_documents(
    docs: Sequence[Document | str], config: CleanConfig | None = None
) -> tuple[list[Document], dict]:
    """Clean every document (see :class:`CleanConfig`); documents left empty are dropped."""
    docs = _as_documents(docs)
    total: Counter = Counter()
    out, changed = [], 0
    for d in docs:
        text, counts = clean_text(d.text, config)
        total.update(counts)
        changed += text != d.text
        if text:
            out.append(Document(text, d.source))
    return out, {
        "docs_in": len(docs),
        "docs_out": len(out),
        "docs_changed": changed,
        "removed_empty": len(docs) - len(out),
        "chars_in": sum(len(d.text) for d in docs),
        "chars_out": sum(len(d.text) for d in out),
        **{
            k: total[k]
            for k in (
                "unicode_normalized_docs",
                "control_chars_removed",
                "doctest_lines_removed",
                "rest_markup_replaced",
                "replacement_chars",
            )
        },
        "config": asdict(config or CleanConfig()),
    }


# ----------------------------------------------------------------------------------------------
# Deduplication
# ----------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")  # what str.split() splits on (Unicode whitespace)


def _shingles(text: str, size: int) -> list[bytes]:
    words = re.findall(r"\w+", text.lower())
    if len(words) <= size:
        return [" ".join(words).encode()]
    return list({" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)})


def deduplicate(
    docs: Sequence[Document | str],
    near: bool = True,
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle_size: int = 5,
    seed: int = 1,
    max_shingle_chars: int | None = 100_000,
) -> tuple[list[Document], dict]:
    """Drop exact duplicates (hash of whitespace-normalised text) and near duplicates.

    Near duplicates: MinHash signatures of word ``shingle_size``-grams indexed in an LSH
    (``datasketch``); a document whose estimated Jaccard similarity to an earlier kept document is
    >= ``threshold`` is dropped. The first occurrence is kept, so the result follows input order.
    Only the first ``max_shingle_chars`` characters of a document are shingled: datasketch holds
    ``num_perm`` 64-bit hashes per shingle at once, so one 50 MB line would need gigabytes, while
    100,000 characters (far longer than a docstring) need about 16 MB (None: no cap).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    docs = _as_documents(docs)
    seen: dict[str, str] = {}
    unique, exact_examples = [], []
    for d in docs:
        # One normalised copy of the text (not a list of its words): memory of one document.
        key = hashlib.sha256(_WHITESPACE.sub(" ", d.text).strip(" ").encode()).hexdigest()
        if key in seen:
            if len(exact_examples) < 5:
                exact_examples.append((seen[key], d.source))
            continue
        seen[key] = d.source
        unique.append(d)
    kept, near_examples = unique, []
    if near and unique:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        signatures = MinHash.bulk(
            (_shingles(d.text[:max_shingle_chars], shingle_size) for d in unique),
            num_perm=num_perm,
            seed=seed,
        )
        kept = []
        for i, (d, sig) in enumerate(zip(unique, signatures)):
            # LSH returns candidates; the estimated Jaccard confirms them
            match = next(
                (j for j in sorted(lsh.query(sig)) if signatures[j].jaccard(sig) >= threshold), None
            )
            if match is not None:
                if len(near_examples) < 5:
                    near_examples.append((unique[match].source, d.source))
                continue
            lsh.insert(i, sig)
            kept.append(d)
    return kept, {
        "docs_in": len(docs),
        "docs_out": len(kept),
        "exact_duplicates": len(docs) - len(unique),
        "near_duplicates": len(unique) - len(kept),
        "chars_in": sum(len(d.text) for d in docs),
        "chars_out": sum(len(d.text) for d in kept),
        "threshold": threshold,
        "num_perm": num_perm,
        "shingle_size": shingle_size,
        "max_shingle_chars": max_shingle_chars,
        "exact_examples": exact_examples,
        "near_examples": near_examples,
    }


# ----------------------------------------------------------------------------------------------
# Quality filters
# ----------------------------------------------------------------------------------------------


@dataclass
class FilterConfig:
    """Heuristic quality filters in the spirit of C4 / Gopher rules, tuned for docstrings.

    symbol ratio = characters that are neither letters, digits nor whitespace, over non-whitespace
    characters (tables, ASCII art, code); alpha-word ratio = words containing a letter over words.
    """

    min_chars: int = 60
    max_chars: int = 20_000
    min_words: int = 8
    max_symbol_ratio: float = 0.25
    min_alpha_word_ratio: float = 0.6
    max_replacement_ratio: float = 0.01  # U+FFFD left by undecodable bytes


def _quality_reason(text: str, c: FilterConfig) -> str | None:
    if len(text) < c.min_chars:
        return "too_short"
    if len(text) > c.max_chars:
        return "too_long"
    words = text.split()
    if len(words) < c.min_words:
        return "too_few_words"
    non_space = sum(len(w) for w in words)
    if sum(not ch.isalnum() for w in words for ch in w) / non_space > c.max_symbol_ratio:
        return "symbol_ratio"
    if sum(any(ch.isalpha() for ch in w) for w in words) / len(words) < c.min_alpha_word_ratio:
        return "alpha_word_ratio"
    if text.count("\ufffd") / len(text) > c.max_replacement_ratio:
        return "replacement_chars"
    return None


def filter_documents(
    docs: Sequence[Document | str], config: FilterConfig | None = None
) -> tuple[list[Document], dict]:
    """Keep documents that pass every rule; count removals by the first rule that failed."""
    config = config or FilterConfig()
    docs = _as_documents(docs)
    reasons: Counter = Counter()
    kept = []
    for d in docs:
        reason = _quality_reason(d.text, config)
        if reason:
            reasons[reason] += 1
        else:
            kept.append(d)
    return kept, {
        "docs_in": len(docs),
        "docs_out": len(kept),
        "removed": dict(sorted(reasons.items())),
        "chars_in": sum(len(d.text) for d in docs),
        "chars_out": sum(len(d.text) for d in kept),
        "config": asdict(config),
    }


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------


def split_of(
    text: str, val_fraction: float = 0.05, test_fraction: float = 0.05, salt: str = "lmref"
) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` from a hash of the content alone.

    The split of a document never depends on the other documents, so adding documents (or
    reordering them) never moves an existing one between splits, and duplicates land together.
    """
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return (
        "test"
        if u < test_fraction
        else "validation"
        if u < test_fraction + val_fraction
        else "train"
    )


def split_documents(
    docs: Sequence[Document | str],
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    salt: str = "lmref",
) -> tuple[dict[str, list[Document]], dict]:
    """Deterministic train/validation/test split by hash of content (see :func:`split_of`)."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need 0 <= fractions and val + test < 1, got {val_fraction}, {test_fraction}"
        )
    splits: dict[str, list[Document]] = {"train": [], "validation": [], "test": []}
    for d in _as_documents(docs):
        splits[split_of(d.text, val_fraction, test_fraction, salt)].append(d)
    return splits, {
        "docs": {k: len(v) for k, v in splits.items()},
        "chars": {k: sum(len(d.text) for d in v) for k, v in splits.items()},
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "salt": salt,
    }


# ----------------------------------------------------------------------------------------------
# Tokenizer and packing
# ----------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> tuple[PreTrainedTokenizerFast, dict]:
    """Train a byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``.

    Byte level: any string encodes (no unknown token) and decodes back exactly. Digits are split
    one by one (as in Llama) so numbers share a small, consistent set of tokens, which is what
    makes arithmetic learnable. bos = eos = ``<|endoftext|>`` (GPT-2 style), pad = ``<|pad|>``.
    Returns ``(tokenizer, stats)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    n_chars = sum(len(t) for t in texts)
    return tokenizer, {
        "vocab_size": len(tokenizer),
        "requested_vocab_size": vocab_size,
        "training_docs": len(texts),
        "training_chars": n_chars,
        "training_tokens": n_tokens,
        "chars_per_token": n_chars / max(n_tokens, 1),
    }


class EmptyPackingError(ValueError):
    """:func:`pack_blocks` made no block: too few tokens for ``block_size``."""

    def __init__(self, tokens: int, block_size: int, batch_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        super().__init__(
            f"{tokens} tokens make no block of block_size={block_size} (documents are "
            f"packed {batch_size} at a time, each group's tail dropped): give more "
            "text or a smaller block_size"
        )


def pack_blocks(
    texts: Sequence[str] | Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 256,
    batch_size: int = 1000,
    text_column: str = "text",
) -> tuple[Dataset, dict]:
    """Tokenize, join documents with EOS and cut the stream into blocks of exactly ``block_size``.

    No padding: every position is a real token, so no compute is spent on pad tokens. Documents
    are concatenated within each ``datasets.map`` batch of ``batch_size`` documents and the
    incomplete tail of each batch is dropped (reported as ``dropped_tokens``).
    Returns ``(Dataset with column input_ids, stats)``; raises ``EmptyPackingError`` (a
    ``ValueError``) when the texts make no block at all.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ds = texts if isinstance(texts, Dataset) else Dataset.from_dict({text_column: list(texts)})
    eos = tokenizer.eos_token_id
    tokenized = ds.map(
        lambda batch: {
            "input_ids": [
                ids + [eos]
                for ids in tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
            ]
        },
        batched=True,
        batch_size=batch_size,
        remove_columns=ds.column_names,
        desc="tokenize",
    )
    n_tokens = sum(len(ids) for ids in tokenized["input_ids"])

    def to_blocks(batch: dict) -> dict:
        stream = [t for ids in batch["input_ids"] for t in ids]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    blocks = tokenized.map(to_blocks, batched=True, batch_size=batch_size, desc="pack")
    n_blocks = len(blocks)
    if n_blocks == 0:
        raise EmptyPackingError(n_tokens, block_size, batch_size)
    return blocks, {
        "docs": len(ds),
        "tokens": n_tokens,
        "blocks": n_blocks,
        "block_size": block_size,
        "tokens_in_blocks": n_blocks * block_size,
        "dropped_tokens": n_tokens - n_blocks * block_size,
        "padding_tokens": 0,
    }


# ----------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Knobs of :func:`prepare_data`. ``source``: ``"stdlib"``, a file/folder, or a dataset name."""

    source: str = "stdlib"
    clean: CleanConfig = field(default_factory=CleanConfig)
    near_duplicates: bool = True
    near_duplicate_threshold: float = 0.8
    num_perm: int = 128
    filters: FilterConfig = field(default_factory=FilterConfig)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    vocab_size: int = 4096
    block_size: int = 256


def save_artifacts(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerBase, corpus: DatasetDict, report: dict
) -> Path:
    """Write ``tokenizer/``, ``corpus/`` and ``report.json`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    corpus.save_to_disk(str(out / "corpus"))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out


def empty_splits_on_disk(folder: str | Path) -> list[str]:
    """Splits of a ``save_to_disk`` folder that hold no rows (``load_from_disk`` fails on them
    with a bare ``IndexError`` inside ``datasets``); ``[]`` for a single data set folder."""
    folder = Path(folder)
    empty = []
    for state in sorted(folder.glob("*/state.json")):
        if not json.loads(state.read_text()).get("_data_files"):
            empty.append(state.parent.name)
    return empty


def load_prepared(
    out_dir: str | Path = "artifacts/data",
) -> tuple[PreTrainedTokenizerFast, DatasetDict]:
    """``(tokenizer, corpus DatasetDict)`` written by :func:`prepare_data`."""
    from datasets import load_from_disk
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if not (out / "report.json").is_file():
        raise FileNotFoundError(
            f"no prepared data in {out}; run prepare_data(out_dir={str(out)!r})"
        )
    empty = empty_splits_on_disk(out / "corpus")
    if empty:  # written by an older prepare_data, which let a split end with no block
        raise ValueError(
            f"the corpus in {out} has empty split(s) {empty}; prepare it again "
            "with more text or a smaller block_size"
        )
    return PreTrainedTokenizerFast.from_pretrained(out / "tokenizer"), load_from_disk(
        str(out / "corpus")
    )


def _require_documents(docs: list[Document], step: str, report: dict, advice: str) -> None:
    if not docs:
        numbers = {
            k: v for k, v in report[step].items() if k in ("docs_in", "removed", "removed_empty")
        }
        raise ValueError(f"no document is left after {step} {numbers}: {advice}")


def prepare_data(config: DataConfig | None = None, out_dir: str | Path = "artifacts/data") -> dict:
    """Run every step (source -> clean -> dedup -> filter -> split -> tokenizer -> pack), write the
    artifacts (see :func:`save_artifacts`) and return the report.

    Fails before writing anything when a step leaves no document, a split is empty, or a split
    makes no block of ``block_size`` tokens (the error names the split, its tokens and the size).
    """
    config = config or DataConfig()
    report: dict[str, Any] = {"config": asdict(config), "seconds": {}}
    start = time.perf_counter()

    def timed(step: str, result: tuple) -> Any:
        nonlocal start
        report[step] = result[1]
        report["seconds"][step] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        return result[0]

    docs = timed("source", load_documents(config.source))
    docs = timed("clean", clean_documents(docs, config.clean))
    _require_documents(
        docs,
        "clean",
        report,
        "every document was empty once cleaned; check the "
        "source, or relax DataConfig.clean (e.g. doctest='keep')",
    )
    docs = timed(
        "dedup",
        deduplicate(
            docs,
            near=config.near_duplicates,
            threshold=config.near_duplicate_threshold,
            num_perm=config.num_perm,
        ),
    )
    docs = timed("filter", filter_documents(docs, config.filters))
    _require_documents(
        docs,
        "filter",
        report,
        "the quality filters removed the whole corpus; "
        "relax DataConfig.filters (see 'removed' for which rule) or give more text",
    )
    splits = timed("split", split_documents(docs, config.val_fraction, config.test_fraction))
    for split, split_docs in splits.items():
        if not split_docs:
            raise ValueError(
                f"the {split} split is empty: {len(docs)} document(s) for fractions "
                f"val={config.val_fraction}, test={config.test_fraction}; give more "
                "documents or change the fractions"
            )
    texts = {k: [d.text for d in v] for k, v in splits.items()}
    tokenizer = timed("tokenizer", train_tokenizer(texts["train"], vocab_size=config.vocab_size))
    corpus, report["packing"] = DatasetDict(), {}
    for split, split_texts in texts.items():
        try:
            corpus[split], report["packing"][split] = pack_blocks(
                split_texts, tokenizer, config.block_size
            )
        except EmptyPackingError as e:
            raise ValueError(
                f"the {split} split has {e.tokens} tokens in {len(split_texts)} "
                f"document(s), not enough for one block of block_size="
                f"{config.block_size}: give more text, lower block_size, or raise "
                f"the fraction of this split"
            ) from None
    report["seconds"]["packing"] = round(time.perf_counter() - start, 3)
    save_artifacts(out_dir, tokenizer, corpus, report)
    return report
