"""Corpus cleaning for language models: normalisation, dedup, quality filters and the split.

Every step takes documents (``lmref.data.sources.Document`` or plain strings) and returns its
result *and* a dict of what it did in numbers (documents in and out, removed by reason), so a
pipeline run leaves a report you can read and compare:

- ``clean_documents``: Unicode normalisation, control characters, doctest examples, reST markup,
  whitespace (``CleanConfig``);
- ``deduplicate``: exact duplicates (hash of normalised text) and near duplicates (MinHash LSH);
- ``filter_documents``: heuristic quality rules in the spirit of C4 / Gopher (``FilterConfig``);
- ``split_documents``: train / validation / test by a hash of the content alone.

Usage::

    from lmref.data.clean import (
        CleanConfig, FilterConfig, clean_documents, deduplicate, filter_documents, split_documents,
    )

    docs, stats = clean_documents(docs, CleanConfig(unicode_form="NFKC"))
    docs, stats = deduplicate(docs, threshold=0.8)
    docs, stats = filter_documents(docs, FilterConfig(min_chars=60))
    splits, stats = split_documents(docs, val_fraction=0.05, test_fraction=0.05)
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

from lmref.data.language import language_counts, normalize_keeping_cjk_punctuation
from lmref.data.sources import Document
from lmref.data.text_rules import (  # noqa: F401  (FilterConfig, _quality_reason, _shingles: re-exported)
    FilterConfig,
    normalize_whitespace,
    remove_control_chars,
    shingle_hashes,
)
from lmref.data.text_rules import quality_reason as _quality_reason
from lmref.data.text_rules import shingles as _shingles  # noqa: F401  (re-exported)


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
    cjk_punctuation: ``"keep"`` (default) leaves full-width punctuation (，！（）：；？) that stands
        beside Han or kana as it is, since it is the standard punctuation of Chinese and
        Japanese and users type it; ``"fold"`` lets NFKC/NFKD turn it into ASCII. Text with no
        CJK character is normalised exactly as before either way.
    """

    unicode_form: str | None = "NFKC"
    remove_control_chars: bool = True
    normalize_whitespace: bool = True
    doctest: str = "drop"
    rest_markup: bool = True
    cjk_punctuation: str = "keep"

    def __post_init__(self) -> None:
        if self.unicode_form not in ("NFC", "NFKC", "NFD", "NFKD", None):
            raise ValueError(
                f"unicode_form must be NFC, NFKC, NFD, NFKD or None, got {self.unicode_form!r}"
            )
        if self.doctest not in ("drop", "prompts", "keep"):
            raise ValueError(f"doctest must be drop|prompts|keep, got {self.doctest!r}")
        if self.cjk_punctuation not in ("keep", "fold"):
            raise ValueError(f"cjk_punctuation must be keep|fold, got {self.cjk_punctuation!r}")


_REST_ROLE = re.compile(r":(?:[\w.+-]+:)*[\w.+-]+:`([!~]?)([^`<]*?)\s*(?:<[^`>]*>)?`")
_REST_LITERAL = re.compile(r"``(.+?)``")
_DOCTEST_PROMPT = re.compile(r"^(\s*)(>>>|\.\.\.)(?: |$)")


def _role_text(m: re.Match) -> str:
    prefix, target = m.group(1), m.group(2)
    # reST: "~a.b.C" shows only the last component "C"
    return target.rsplit(".", 1)[-1] if prefix == "~" else target


def _strip_doctest(text: str, mode: str) -> tuple[str, int]:
    if ">>>" not in text and (mode == "drop" or "..." not in text):
        return text, 0  # nothing to strip: skip the per-line loop (most documents)
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
        if config.cjk_punctuation == "keep" and config.unicode_form in ("NFKC", "NFKD"):
            normalized, kept = normalize_keeping_cjk_punctuation(text, config.unicode_form)
            counts["cjk_punctuation_kept"] += kept
        else:
            normalized = unicodedata.normalize(config.unicode_form, text)
        counts["unicode_normalized_docs"] += normalized != text
        text = normalized
    if config.remove_control_chars:
        # Cc (C0/C1 controls) and Cf (zero-width spaces, BOMs, soft hyphens); keep \n and \t
        text, n = remove_control_chars(text)
        counts["control_chars_removed"] += n
    if config.doctest != "keep":
        text, n = _strip_doctest(text, config.doctest)
        counts["doctest_lines_removed"] += n
    if config.rest_markup:
        text, n_roles = _REST_ROLE.subn(_role_text, text)
        text, n_literals = _REST_LITERAL.subn(r"\1", text)
        counts["rest_markup_replaced"] += n_roles + n_literals
    if config.normalize_whitespace:
        text = normalize_whitespace(text)
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
            out.append(replace(d, text=text))  # keeps the source and the language
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
                "cjk_punctuation_kept",
            )
        },
        "languages": language_counts(out),
        "config": asdict(config or CleanConfig()),
    }


# ----------------------------------------------------------------------------------------------
# Deduplication
# ----------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")  # what str.split() splits on (Unicode whitespace)


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

    Near duplicates: MinHash signatures of word ``shingle_size``-grams (character n-grams in
    Chinese and Japanese, see ``lmref.data.language.word_units``) indexed in an LSH
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
        # Hashed here (datasketch's sha1_hash32, without a Python call per shingle): hashfunc=int
        signatures = MinHash.bulk(
            (shingle_hashes(d.text[:max_shingle_chars], shingle_size) for d in unique),
            num_perm=num_perm,
            seed=seed,
            hashfunc=int,
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
        "languages": language_counts(kept),
    }


# ----------------------------------------------------------------------------------------------
# Quality filters
# ----------------------------------------------------------------------------------------------


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
        "languages": language_counts(kept),
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
        "languages": {k: language_counts(v) for k, v in splits.items()},
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "salt": salt,
    }
