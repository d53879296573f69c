"""Data preparation for language models: sources, cleaning, dedup, filters, split, tokenizer, packing.

Every step returns its result *and* a dict of what it did in numbers (documents in and out,
removed by reason, tokens, blocks), so a pipeline run leaves a report you can read and compare.
The default corpus needs no network: the docstrings of the running interpreter's standard library
(about 1.8 MB of English technical prose on Python 3.11). Local text files and any Hugging Face
``datasets`` dataset (when online) go through the same steps.

The module also builds a small instruction dataset of templated tasks with exactly checkable
answers (dates in words, sorting and reversing words, addition, upper case), a prompt template,
and a collator that masks the prompt out of the loss.

Usage::

    from lmref.data import DataConfig, prepare_data, load_prepared

    report = prepare_data(DataConfig(vocab_size=4096, block_size=256), out_dir="artifacts/data")
    print(report["dedup"]["exact_duplicates"], report["packing"]["train"]["blocks"])
    tokenizer, corpus, instructions = load_prepared("artifacts/data")

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

import ast
import hashlib
import inspect
import json
import random
import re
import subprocess
import sys
import sysconfig
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset, DatasetDict

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Answer:\n"
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class Document:
    """A unit of text and where it came from (a file path, ``module.qualname``, a dataset row)."""

    text: str
    source: str


def _as_documents(docs: Iterable[Document | str]) -> list[Document]:
    return [d if isinstance(d, Document) else Document(str(d), f"doc[{i}]")
            for i, d in enumerate(docs)]


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")  # one per byte that was not valid UTF-8


def _decode(raw: bytes, on_decode_error: str) -> tuple[str | None, int]:
    """Decode UTF-8; return (text or None when the file is skipped, number of undecodable bytes).

    ``surrogateescape`` maps each bad byte to one lone surrogate, so the bytes can be counted
    exactly in linear time before they are replaced or dropped.
    """
    text = raw.decode("utf-8", errors="surrogateescape")
    bad = len(_SURROGATE_ESCAPE.findall(text))
    if bad == 0:
        return text, 0
    if on_decode_error == "raise":
        raise UnicodeDecodeError("utf-8", raw, 0, len(raw), f"{bad} undecodable bytes")
    if on_decode_error == "skip":
        return None, bad
    return _SURROGATE_ESCAPE.sub("\ufffd" if on_decode_error == "replace" else "", text), bad


def load_text_files(paths: str | Path | Sequence[str | Path],
                    suffixes: Sequence[str] = TEXT_SUFFIXES,
                    on_decode_error: str = "replace",
                    separator: str | None = None) -> tuple[list[Document], dict]:
    """Read text files and folders (recursively, sorted) as UTF-8 documents.

    Bytes that are not valid UTF-8 are counted per file and then, by ``on_decode_error``:
    ``"replace"`` with U+FFFD, ``"drop"``, ``"skip"`` the file, or ``"raise"``. Empty and binary
    files (a NUL byte) are skipped and counted. ``separator`` (e.g. ``"\\n%%\\n"``) cuts a file
    into several documents. Raises ``FileNotFoundError`` for a missing path and ``ValueError``
    when no text is found.
    """
    if on_decode_error not in ("replace", "drop", "skip", "raise"):
        raise ValueError(f"on_decode_error must be replace|drop|skip|raise, got {on_decode_error!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    stats = Counter(files=len(files), bytes=0, empty_files=0, binary_files=0,
                    files_with_undecodable_bytes=0, undecodable_bytes=0, skipped_undecodable_files=0)
    undecodable: dict[str, int] = {}
    docs: list[Document] = []
    for f in files:
        raw = f.read_bytes()
        stats["bytes"] += len(raw)
        if not raw.strip():
            stats["empty_files"] += 1
            continue
        if b"\x00" in raw[:8192]:
            stats["binary_files"] += 1
            continue
        try:
            text, bad = _decode(raw, on_decode_error)
        except UnicodeDecodeError as e:
            raise UnicodeDecodeError("utf-8", raw, e.start, e.end, f"{f}: {e.reason}") from None
        if bad:
            stats["files_with_undecodable_bytes"] += 1
            stats["undecodable_bytes"] += bad
            undecodable[str(f)] = bad
        if text is None:
            stats["skipped_undecodable_files"] += 1
            continue
        parts = text.split(separator) if separator else [text]
        docs += [Document(t, f"{f}#{i}" if separator else str(f))
                 for i, t in enumerate(parts) if t.strip()]
    if undecodable:
        warnings.warn(f"{stats['undecodable_bytes']} bytes that are not UTF-8 in "
                      f"{len(undecodable)} file(s) (on_decode_error={on_decode_error!r}): "
                      f"{sorted(undecodable)[:5]}",
                      stacklevel=2)
    if not docs:
        raise ValueError(f"no text found in {[str(p) for p in paths]}: {len(files)} file(s) with "
                         f"suffix {tuple(suffixes)}, {stats['empty_files']} empty, "
                         f"{stats['binary_files']} binary, "
                         f"{stats['skipped_undecodable_files']} skipped as undecodable")
    out = dict(stats, docs=len(docs), chars=sum(len(d.text) for d in docs),
               undecodable_by_file=undecodable, on_decode_error=on_decode_error)
    return docs, out


# Never parsed or imported: GUI and demo code, test suites, vendored installers, and easter eggs
# whose import has side effects (``antigravity`` opens a browser, ``this`` prints the Zen).
STDLIB_SKIP = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
    "pydoc_data", "antigravity", "this", "__phello__", "_pyrepl", "site-packages",
    "dist-packages", "__pycache__", "readline", "_tkinter", "_curses", "_curses_panel",
})


def _skip_module(name: str) -> bool:
    return (name in STDLIB_SKIP or name.startswith(("test", "_test", "xx", "_xx"))
            or name.endswith("_test"))


def _source_docstrings(tree: ast.Module, module: str) -> list[Document]:
    """Docstrings of a module and, recursively, its classes and functions, in source order."""
    docs = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            docs.append(Document(doc, qualname))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return docs


def _compiled_docstrings_worker(names: list[str]) -> dict:
    """Docstrings of compiled modules: the module, its functions, its classes and their members.

    Self-contained (stdlib only) because it runs in a fresh ``python -I -S`` process: the caller
    may have patched ``builtins`` or ``sys`` (an IPython kernel replaces ``input`` and injects
    ``get_ipython``), which would make the corpus depend on where it was built, and imports stay
    out of the caller's process. ``__doc__`` is read directly: ``inspect.getdoc`` would repeat
    inherited docs.
    """
    import importlib
    import inspect
    import warnings

    docs, failed = [], []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules (nis, audioop, ...) warn
                module = importlib.import_module(name)
        except Exception:  # not in this build (e.g. Windows-only modules on Linux)
            failed.append(name)
            continue
        seen = set()

        def add(obj, qualname, seen=seen):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and doc.strip() and id(obj) not in seen:
                seen.add(id(obj))
                docs.append((inspect.cleandoc(doc), qualname))

        # only what the module defines; _collections.deque reports module "collections"
        own = {name, name.lstrip("_")}
        add(module, name)
        for attr, obj in sorted(vars(module).items()):
            if getattr(obj, "__module__", None) not in own:
                continue
            if inspect.isclass(obj):
                add(obj, f"{name}.{attr}")
                for member, value in sorted(vars(obj).items()):
                    if callable(value) or inspect.isdatadescriptor(value):
                        add(value, f"{name}.{attr}.{member}")
            elif inspect.isroutine(obj):
                add(obj, f"{name}.{attr}")
    return {"docs": docs, "failed": failed}


def _compiled_docstrings(names: list[str]) -> tuple[list[Document], list[str]]:
    """Run :func:`_compiled_docstrings_worker` in a clean interpreter; (documents, failed names)."""
    script = (inspect.getsource(_compiled_docstrings_worker)
              + "\nimport json, sys\nprint(json.dumps(_compiled_docstrings_worker(json.loads(sys.argv[1]))))\n")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script, json.dumps(names)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"reading compiled stdlib modules failed: {result.stderr[-2000:]}")
    out = json.loads(result.stdout)
    return [Document(text, source) for text, source in out["docs"]], out["failed"]


def load_stdlib_docstrings(modules: Sequence[str] | None = None) -> tuple[list[Document], dict]:
    """The docstrings of the running interpreter's standard library, fully offline.

    Modules written in Python are *parsed* with ``ast`` (never imported, so importing has no side
    effects and nothing can fail at import time); compiled modules (``math``, ``builtins``, ...)
    are imported, in a separate clean interpreter, to read their ``__doc__``. Test suites,
    GUI code and easter eggs are skipped (``STDLIB_SKIP``). The order is deterministic: modules
    sorted by name, docstrings in source order.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(modules if modules is not None else sys.stdlib_module_names)
    stats = Counter()
    docs: list[Document] = []
    compiled: list[str] = []  # read after the Python modules, in one clean subprocess
    for name in names:
        if _skip_module(name):
            stats["modules_skipped"] += 1
            continue
        package, single = stdlib / name, stdlib / f"{name}.py"
        if (package / "__init__.py").is_file():
            files = sorted(f for f in package.rglob("*.py")
                           if not any(_skip_module(part) for part in f.relative_to(stdlib).parts[:-1])
                           and not _skip_module(f.stem))
        elif single.is_file():
            files = [single]
        else:
            compiled.append(name)
            continue
        for f in files:
            rel = f.relative_to(stdlib).with_suffix("")
            module = ".".join(p for p in rel.parts if p != "__init__")
            try:
                tree = ast.parse(f.read_bytes(), filename=str(f))
            except (SyntaxError, ValueError):
                stats["files_unparsable"] += 1
                continue
            stats["source_files"] += 1
            docs += _source_docstrings(tree, module)
        stats["source_modules"] += 1
    if compiled:
        compiled_docs, failed = _compiled_docstrings(compiled)
        docs += compiled_docs
        stats["compiled_modules"] += len(compiled) - len(failed)
        stats["modules_failed_import"] += len(failed)
    if not docs:
        raise ValueError(f"no docstrings found in the standard library at {stdlib}")
    out = dict(stats, docs=len(docs), chars=sum(len(d.text) for d in docs),
               python=sys.version.split()[0])
    return docs, out


def load_hf_dataset(name: str, split: str = "train", text_column: str = "text",
                    max_docs: int | None = None, **load_kwargs: Any) -> tuple[list[Document], dict]:
    """Documents from any ``datasets`` dataset: a hub name (needs network) or a local path."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split, **load_kwargs)
    except Exception as e:
        raise RuntimeError(f"could not load dataset {name!r} (split {split!r}); offline, use a "
                           f"local path or the 'stdlib' source: {e}") from e
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_column!r}; columns: {ds.column_names}")
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    docs = [Document(t, f"{name}[{i}]") for i, t in enumerate(ds[text_column])
            if isinstance(t, str) and t.strip()]
    return docs, {"rows": len(ds), "docs": len(docs), "chars": sum(len(d.text) for d in docs),
                  "dataset": name, "split": split}


def load_documents(source: str | Path = "stdlib", **kwargs: Any) -> tuple[list[Document], dict]:
    """Dispatch on ``source``: ``"stdlib"``, an existing file or folder, else a ``datasets`` name."""
    if str(source) == "stdlib":
        return load_stdlib_docstrings(**kwargs)
    if Path(source).exists():
        return load_text_files(source, **kwargs)
    return load_hf_dataset(str(source), **kwargs)


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
            raise ValueError(f"unicode_form must be NFC, NFKC, NFD, NFKD or None, got {self.unicode_form!r}")
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
                line = m.group(1) + line[m.end():]
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
        kept = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf"))
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
        text = "\n".join(re.sub(r"[^\S\n]", " ", line.expandtabs(4)).rstrip()
                         for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", _EXTRA_SPACES.sub(" ", text)).strip()
    counts["replacement_chars"] += text.count("\ufffd")
    return text, counts


def clean_documents(docs: Sequence[Document | str],
                    config: CleanConfig | None = None) -> tuple[list[Document], dict]:
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
        "docs_in": len(docs), "docs_out": len(out), "docs_changed": changed,
        "removed_empty": len(docs) - len(out),
        "chars_in": sum(len(d.text) for d in docs), "chars_out": sum(len(d.text) for d in out),
        **{k: total[k] for k in ("unicode_normalized_docs", "control_chars_removed",
                                 "doctest_lines_removed", "rest_markup_replaced",
                                 "replacement_chars")},
        "config": asdict(config or CleanConfig()),
    }


# ----------------------------------------------------------------------------------------------
# Deduplication
# ----------------------------------------------------------------------------------------------

def _shingles(text: str, size: int) -> list[bytes]:
    words = re.findall(r"\w+", text.lower())
    if len(words) <= size:
        return [" ".join(words).encode()]
    return list({" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)})


def deduplicate(docs: Sequence[Document | str], near: bool = True, threshold: float = 0.8,
                num_perm: int = 128, shingle_size: int = 5,
                seed: int = 1) -> tuple[list[Document], dict]:
    """Drop exact duplicates (hash of whitespace-normalised text) and near duplicates.

    Near duplicates: MinHash signatures of word ``shingle_size``-grams indexed in an LSH
    (``datasketch``); a document whose estimated Jaccard similarity to an earlier kept document is
    >= ``threshold`` is dropped. The first occurrence is kept, so the result follows input order.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    docs = _as_documents(docs)
    seen: dict[str, str] = {}
    unique, exact_examples = [], []
    for d in docs:
        key = hashlib.sha256(" ".join(d.text.split()).encode()).hexdigest()
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
        signatures = MinHash.bulk((_shingles(d.text, shingle_size) for d in unique),
                                  num_perm=num_perm, seed=seed)
        kept = []
        for i, (d, sig) in enumerate(zip(unique, signatures)):
            # LSH returns candidates; the estimated Jaccard confirms them
            match = next((j for j in sorted(lsh.query(sig))
                          if signatures[j].jaccard(sig) >= threshold), None)
            if match is not None:
                if len(near_examples) < 5:
                    near_examples.append((unique[match].source, d.source))
                continue
            lsh.insert(i, sig)
            kept.append(d)
    return kept, {
        "docs_in": len(docs), "docs_out": len(kept),
        "exact_duplicates": len(docs) - len(unique), "near_duplicates": len(unique) - len(kept),
        "chars_in": sum(len(d.text) for d in docs), "chars_out": sum(len(d.text) for d in kept),
        "threshold": threshold, "num_perm": num_perm, "shingle_size": shingle_size,
        "exact_examples": exact_examples, "near_examples": near_examples,
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


def filter_documents(docs: Sequence[Document | str],
                     config: FilterConfig | None = None) -> tuple[list[Document], dict]:
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
        "docs_in": len(docs), "docs_out": len(kept), "removed": dict(sorted(reasons.items())),
        "chars_in": sum(len(d.text) for d in docs), "chars_out": sum(len(d.text) for d in kept),
        "config": asdict(config),
    }


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------

def split_of(text: str, val_fraction: float = 0.05, test_fraction: float = 0.05,
             salt: str = "lmref") -> str:
    """``"train"``, ``"validation"`` or ``"test"`` from a hash of the content alone.

    The split of a document never depends on the other documents, so adding documents (or
    reordering them) never moves an existing one between splits, and duplicates land together.
    """
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "train"


def split_documents(docs: Sequence[Document | str], val_fraction: float = 0.05,
                    test_fraction: float = 0.05,
                    salt: str = "lmref") -> tuple[dict[str, list[Document]], dict]:
    """Deterministic train/validation/test split by hash of content (see :func:`split_of`)."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= fractions and val + test < 1, got {val_fraction}, {test_fraction}")
    splits: dict[str, list[Document]] = {"train": [], "validation": [], "test": []}
    for d in _as_documents(docs):
        splits[split_of(d.text, val_fraction, test_fraction, salt)].append(d)
    return splits, {
        "docs": {k: len(v) for k, v in splits.items()},
        "chars": {k: sum(len(d.text) for d in v) for k, v in splits.items()},
        "val_fraction": val_fraction, "test_fraction": test_fraction, "salt": salt,
    }


# ----------------------------------------------------------------------------------------------
# Tokenizer and packing
# ----------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                    model_max_length: int = 2048) -> tuple[PreTrainedTokenizerFast, dict]:
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
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    n_chars = sum(len(t) for t in texts)
    return tokenizer, {"vocab_size": len(tokenizer), "requested_vocab_size": vocab_size,
                       "training_docs": len(texts), "training_chars": n_chars,
                       "training_tokens": n_tokens, "chars_per_token": n_chars / max(n_tokens, 1)}


def pack_blocks(texts: Sequence[str] | Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int = 256,
                batch_size: int = 1000, text_column: str = "text") -> tuple[Dataset, dict]:
    """Tokenize, join documents with EOS and cut the stream into blocks of exactly ``block_size``.

    No padding: every position is a real token, so no compute is spent on pad tokens. Documents
    are concatenated within each ``datasets.map`` batch of ``batch_size`` documents and the
    incomplete tail of each batch is dropped (reported as ``dropped_tokens``).
    Returns ``(Dataset with column input_ids, stats)``.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ds = texts if isinstance(texts, Dataset) else Dataset.from_dict({text_column: list(texts)})
    eos = tokenizer.eos_token_id
    tokenized = ds.map(
        lambda batch: {"input_ids": [ids + [eos] for ids in
                                     tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]]},
        batched=True, batch_size=batch_size, remove_columns=ds.column_names,
        desc="tokenize",
    )
    n_tokens = sum(len(ids) for ids in tokenized["input_ids"])

    def to_blocks(batch: dict) -> dict:
        stream = [t for ids in batch["input_ids"] for t in ids]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i:i + block_size] for i in range(0, usable, block_size)]}

    blocks = tokenized.map(to_blocks, batched=True, batch_size=batch_size, desc="pack")
    n_blocks = len(blocks)
    return blocks, {"docs": len(ds), "tokens": n_tokens, "blocks": n_blocks,
                    "block_size": block_size, "tokens_in_blocks": n_blocks * block_size,
                    "dropped_tokens": n_tokens - n_blocks * block_size, "padding_tokens": 0}


# ----------------------------------------------------------------------------------------------
# Instruction data
# ----------------------------------------------------------------------------------------------

# Templated tasks whose answers are short, exactly checkable and need a transformation of the input
# (not a copy of a span of it). data/instruction_tasks.json is a copy of this table (a test keeps
# them equal); InstructionConfig.task_specs_path loads an edited one.
TASK_SPECS: dict[str, dict] = {
    "date": {
        "template": "Write the date {iso} in words.",
        "months": ["January", "February", "March", "April", "May", "June", "July", "August",
                   "September", "October", "November", "December"],
        "years": [1950, 2049], "days": [1, 28],
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
        "words": ["file", "list", "string", "value", "name", "type", "object", "error", "data",
                  "line", "path", "time", "key", "module", "class", "text", "word", "code", "node",
                  "user", "host", "port", "mode", "size"],
        "lengths": [3, 4],
    },
    "sort": {
        "template": "Sort the words alphabetically: {words}",
        "words": ["apple", "bread", "cheese", "dates", "eggs", "flour", "grapes", "honey", "jam",
                  "lemon", "milk", "nuts", "olives", "pears", "rice", "salt"],
        "lengths": [3],
    },
    "add": {
        "template": "What is {a} plus {b}?",
        "a": [10, 99], "b": [1, 9],
    },
    "uppercase": {
        "template": "Write in capital letters: {words}",
        "words": ["red", "name", "default", "time", "text", "test", "node", "user", "port", "lock",
                  "state", "read", "send", "run", "load"],
        "lengths": [2, 3],
    },
}


def _task_example(task: str, spec: dict, rng: random.Random) -> tuple[str, str]:
    t = spec["template"]
    if task == "date":
        y, m, d = rng.randint(*spec["years"]), rng.randint(1, 12), rng.randint(*spec["days"])
        return t.format(iso=f"{y:04d}-{m:02d}-{d:02d}"), f"{d} {spec['months'][m - 1]} {y}"
    if task == "time":
        h, m = rng.randint(0, 23), rng.randint(0, 59)
        return t.format(hhmm=f"{h:02d}:{m:02d}"), f"{(h - 1) % 12 + 1}:{m:02d} {'am' if h < 12 else 'pm'}"
    if task == "digits":
        digits = [rng.randint(1, 9)] + [rng.randint(0, 9) for _ in range(rng.choice(spec["lengths"]) - 1)]
        number = "".join(map(str, digits))
        return t.format(number=number), " ".join(spec["names"][d] for d in digits)
    if task in ("reverse", "sort", "uppercase"):
        words = rng.sample(spec["words"], rng.choice(spec["lengths"]))
        answer = {"reverse": lambda w: w[::-1], "sort": sorted,
                  "uppercase": lambda w: [x.upper() for x in w]}[task](words)
        return t.format(words=" ".join(words)), " ".join(answer)
    if task == "add":
        a, b = rng.randint(*spec["a"]), rng.randint(*spec["b"])
        return t.format(a=a, b=b), str(a + b)
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_SPECS)}")


@dataclass
class InstructionConfig:
    """Which tasks, how many unique examples of each, and the seed."""

    tasks: tuple[str, ...] = ("date", "time", "digits", "sort", "uppercase")
    train_per_task: int = 2000
    test_per_task: int = 100
    seed: int = 0
    task_specs_path: str | None = None  # a JSON shaped like TASK_SPECS; None = the built-in table


def make_instruction_dataset(config: InstructionConfig | None = None) -> tuple[DatasetDict, dict]:
    """A train/test DatasetDict (columns ``task``, ``instruction``, ``answer``).

    Each instruction is unique across both splits, so no test input is ever seen in training:
    test accuracy measures the learned transformation, not memorisation.
    """
    config = config or InstructionConfig()
    specs = (json.loads(Path(config.task_specs_path).read_text()) if config.task_specs_path
             else TASK_SPECS)
    rng = random.Random(config.seed)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    stats: dict[str, Any] = {"tasks": {}}
    for task in config.tasks:
        if task not in specs:
            raise ValueError(f"unknown task {task!r}; known: {sorted(specs)}")
        wanted = config.train_per_task + config.test_per_task
        examples: dict[str, str] = {}
        copies = 0
        # Rejection sampling of distinct inputs; a task with fewer distinct inputs than wanted
        # (e.g. 810 additions) gives all it has to train, after the test share.
        for _ in range(30 * wanted):
            if len(examples) == wanted:
                break
            instruction, answer = _task_example(task, specs[task], rng)
            if answer in instruction:  # e.g. words already in order: a copy, not a transformation
                copies += 1
                continue
            examples.setdefault(instruction, answer)
        if len(examples) <= config.test_per_task:
            raise ValueError(f"task {task!r} has only {len(examples)} distinct inputs, not more "
                             f"than test_per_task={config.test_per_task}")
        items = list(examples.items())  # insertion order is deterministic for a given seed
        for split, part in (("test", items[:config.test_per_task]),
                            ("train", items[config.test_per_task:])):
            rows[split] += [{"task": task, "instruction": i, "answer": a} for i, a in part]
        stats["tasks"][task] = {"train": len(items) - config.test_per_task,
                                "test": config.test_per_task, "rejected_copies": copies,
                                "example": items[0]}
    train_inputs = {r["instruction"] for r in rows["train"]}
    shared = sum(r["instruction"] in train_inputs for r in rows["test"])
    assert shared == 0, "an instruction is in both splits"
    ds = DatasetDict({k: Dataset.from_list(v) for k, v in rows.items()})
    stats.update(train=len(ds["train"]), test=len(ds["test"]), shared_inputs=shared,
                 answer_chars_max=max(len(r["answer"]) for v in rows.values() for r in v),
                 seed=config.seed)
    return ds, stats


def format_prompt(instruction: str) -> str:
    """The prompt template; the model is trained to continue it with the answer and then EOS."""
    return PROMPT_TEMPLATE.format(instruction=instruction)


def tokenize_instructions(ds: Dataset, tokenizer: PreTrainedTokenizerBase,
                          max_length: int = 128) -> Dataset:
    """``input_ids`` = prompt + answer + EOS; ``labels`` = -100 on the prompt, the ids elsewhere.

    Prompt and answer are tokenized separately, so the prompt's tokens are exactly those the model
    sees at generation time (``tokenizer(format_prompt(instruction))``). Raises ``ValueError``
    when an example is longer than ``max_length`` (truncation would cut the answer off).
    """
    missing = {"instruction", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"dataset needs columns instruction and answer; missing {sorted(missing)}")

    def encode(batch: dict) -> dict:
        prompts = tokenizer([format_prompt(i) for i in batch["instruction"]],
                            add_special_tokens=False)["input_ids"]
        answers = tokenizer(batch["answer"], add_special_tokens=False)["input_ids"]
        input_ids, labels = [], []
        for p, a in zip(prompts, answers):
            ids = p + a + [tokenizer.eos_token_id]
            if len(ids) > max_length:
                raise ValueError(f"example of {len(ids)} tokens > max_length={max_length}")
            input_ids.append(ids)
            labels.append([IGNORE_INDEX] * len(p) + a + [tokenizer.eos_token_id])
        return {"input_ids": input_ids, "labels": labels}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")


class InstructionCollator:
    """Pad a list of ``{"input_ids", "labels"}`` to the longest in the batch (dynamic padding).

    Returns LongTensors ``input_ids`` (padded with pad_token_id), ``attention_mask`` (0 on padding)
    and ``labels`` (padded with -100, so padding, like the prompt, carries no loss). Right padding:
    fine for training; batched generation pads on the left instead.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        if any("input_ids" not in f or "labels" not in f for f in features):
            raise ValueError("each example needs input_ids and labels (see tokenize_instructions)")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids, labels = list(f["input_ids"]), list(f["labels"])
            if len(ids) != len(labels):
                raise ValueError(f"input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
            pad = length - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
            batch["labels"].append(labels + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


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
    instructions: InstructionConfig = field(default_factory=InstructionConfig)


def save_artifacts(out_dir: str | Path, tokenizer: PreTrainedTokenizerBase, corpus: DatasetDict,
                   instructions: DatasetDict, report: dict) -> Path:
    """Write ``tokenizer/``, ``corpus/``, ``instructions/`` and ``report.json`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    corpus.save_to_disk(str(out / "corpus"))
    instructions.save_to_disk(str(out / "instructions"))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out


def load_prepared(out_dir: str | Path = "artifacts/data",
                  ) -> tuple[PreTrainedTokenizerFast, DatasetDict, DatasetDict]:
    """``(tokenizer, corpus DatasetDict, instructions DatasetDict)`` written by :func:`prepare_data`."""
    from datasets import load_from_disk
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if not (out / "report.json").is_file():
        raise FileNotFoundError(f"no prepared data in {out}; run prepare_data(out_dir={str(out)!r})")
    return (PreTrainedTokenizerFast.from_pretrained(out / "tokenizer"),
            load_from_disk(str(out / "corpus")), load_from_disk(str(out / "instructions")))


def prepare_data(config: DataConfig | None = None, out_dir: str | Path = "artifacts/data") -> dict:
    """Run every step (source -> clean -> dedup -> filter -> split -> tokenizer -> pack, plus the
    instruction set), write the artifacts (see :func:`save_artifacts`) and return the report."""
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
    docs = timed("dedup", deduplicate(docs, near=config.near_duplicates,
                                      threshold=config.near_duplicate_threshold,
                                      num_perm=config.num_perm))
    docs = timed("filter", filter_documents(docs, config.filters))
    splits = timed("split", split_documents(docs, config.val_fraction, config.test_fraction))
    texts = {k: [d.text for d in v] for k, v in splits.items()}
    tokenizer = timed("tokenizer", train_tokenizer(texts["train"], vocab_size=config.vocab_size))
    corpus, report["packing"] = DatasetDict(), {}
    for split, split_texts in texts.items():
        if not split_texts:
            raise ValueError(f"the {split} split is empty: too few documents for the fractions")
        corpus[split], report["packing"][split] = pack_blocks(split_texts, tokenizer, config.block_size)
    report["seconds"]["packing"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    instructions = timed("instructions", make_instruction_dataset(config.instructions))
    save_artifacts(out_dir, tokenizer, corpus, instructions, report)
    return report
