"""Corpus preparation for language models: sources, cleaning, dedup, filters, split, tokenizer, packing.

Every step returns its result *and* a dict of what it did in numbers (documents in and out,
removed by reason, tokens, blocks), so a pipeline run leaves a report you can read and compare.
The default corpus needs no network: the docstrings of the running interpreter's standard library
(about 1.8 MB of English technical prose on Python 3.11). Local text files and any Hugging Face
``datasets`` dataset (when online) go through the same steps.

This module runs the steps in order and saves what they make; the steps live beside it and are
re-exported here, so the whole pipeline reads from one module: where the text comes from
(files, the standard library's docstrings, HF datasets) in ``lmref.data.sources``; cleaning,
dedup, filters and the split in ``lmref.data.clean``; the tokenizer and packing in
``lmref.data.tokens``. The instruction data set (templated tasks, prompt template, loss masking,
collator) is ``lmref.data.instructions``; this module does not need it.

Usage::

    from lmref.data.pipeline import DataConfig, prepare_data, load_prepared

    report = prepare_data(DataConfig(vocab_size=4096, block_size=256), out_dir="artifacts/data")
    print(report["dedup"]["exact_duplicates"], report["packing"]["train"]["blocks"])
    tokenizer, corpus = load_prepared("artifacts/data")

Step by step (what notebook 01 does)::

    docs, stats = load_stdlib_docstrings()              # or load_mix(["stdlib", "zh-fortunes"])
    docs, stats = detect_languages(docs)                # Document.language; stats["languages"]
    docs, stats = clean_documents(docs, CleanConfig(unicode_form="NFKC"))
    docs, stats = deduplicate(docs, threshold=0.8)
    docs, stats = filter_documents(docs, FilterConfig(min_chars=60))
    splits, stats = split_documents(docs, val_fraction=0.05, test_fraction=0.05)
    tokenizer, stats = train_tokenizer([d.text for d in splits["train"]], vocab_size=4096)
    chars_per_token(tokenizer, texts_by_language(splits["validation"]))   # {"en": {...}, "zh": ...}
    blocks, stats = pack_blocks([d.text for d in splits["train"]], tokenizer, block_size=256)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import DatasetDict

# Re-exported: the whole pipeline from one module (notebook 01 goes through it step by step).
from lmref.core.manifest import write_manifest
from lmref.data.clean import (  # noqa: F401
    CleanConfig,
    FilterConfig,
    clean_documents,
    clean_text,
    deduplicate,
    filter_documents,
    split_documents,
    split_of,
)
from lmref.data.corpora import load_mix, load_zh_fortunes  # noqa: F401
from lmref.data.decontaminate import decontaminate
from lmref.data.language import (  # noqa: F401
    DEFAULT_LANGUAGES,
    detect_languages,
    language_counts,
    text_units,
    texts_by_language,
)
from lmref.data.pii import mask_documents
from lmref.data.sources import (  # noqa: F401
    STDLIB_SKIP,
    TEXT_SUFFIXES,
    Document,
    load_documents,
    load_hf_dataset,
    load_stdlib_docstrings,
    load_text_files,
)
from lmref.data.tokens import (  # noqa: F401
    EOS_TOKEN,
    PAD_TOKEN,
    EmptyPackingError,
    chars_per_token,
    pack_blocks,
    train_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


@dataclass
class DataConfig:
    """Knobs of :func:`prepare_data`. ``source``: ``"stdlib"``, ``"zh-fortunes"``, a file/folder,
    or a dataset name; ``mix``: more sources added to it (e.g. ``("zh-fortunes",)``: none by
    default). ``languages``: the candidates of language detection (``detect_language=False``
    skips it and every document counts as ``"und"``)."""

    source: str = "stdlib"
    mix: tuple[str, ...] = ()
    detect_language: bool = True
    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    clean: CleanConfig = field(default_factory=CleanConfig)
    near_duplicates: bool = True
    near_duplicate_threshold: float = 0.8
    num_perm: int = 128
    filters: FilterConfig = field(default_factory=FilterConfig)
    mask_pii: bool = True  # lmref.data.pii: e-mail, phone, IDs, IPs, cards, keys -> <TYPE>
    decontaminate: bool = True  # drop training documents holding a held-out item's 13-gram
    decontaminate_n: int = 13
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
    # The tokenizer folder only: datasets writes cache files into a corpus folder it loads from.
    write_manifest(out / "tokenizer")
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


def prepare_data(
    config: DataConfig | None = None,
    out_dir: str | Path = "artifacts/data",
    eval_texts: Sequence[str] = (),
) -> dict:
    """Run every step (source -> clean -> dedup -> filter -> PII -> split -> decontaminate ->
    tokenizer -> pack), write the artifacts (see :func:`save_artifacts`) and return the report.

    Decontamination checks the validation and test documents, and ``eval_texts`` (e.g. the
    instruction set's validation and test items, instruction and answer), against the training
    split and drops the training documents that hold them.

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

    source = load_mix([config.source, *config.mix]) if config.mix else load_documents(config.source)
    docs = timed("source", source)
    if config.detect_language:
        docs = timed("language", detect_languages(docs, config.languages))
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
    if config.mask_pii:
        docs = timed("pii", mask_documents(docs))
    splits = timed("split", split_documents(docs, config.val_fraction, config.test_fraction))
    if config.decontaminate:
        held_out = [d.text for k in ("validation", "test") for d in splits.get(k, [])]
        splits["train"] = timed(
            "decontaminate",
            decontaminate(splits["train"], held_out + list(eval_texts), config.decontaminate_n),
        )
    for split, split_docs in splits.items():
        if not split_docs:
            raise ValueError(
                f"the {split} split is empty: {len(docs)} document(s) for fractions "
                f"val={config.val_fraction}, test={config.test_fraction}; give more "
                "documents or change the fractions"
            )
    texts = {k: [d.text for d in v] for k, v in splits.items()}
    tokenizer = timed("tokenizer", train_tokenizer(texts["train"], vocab_size=config.vocab_size))
    # Per language: what the tokenizer was trained on, and how well it compresses held-out text.
    report["tokenizer"]["languages"] = language_counts(splits["train"])
    report["tokenizer"]["validation_chars_per_token"] = chars_per_token(
        tokenizer, texts_by_language(splits["validation"])
    )
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
