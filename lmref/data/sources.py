"""Where a corpus comes from: local text files, the standard library's docstrings, HF datasets.

Each loader returns ``(documents, stats)``: ``Document`` objects and a dict of what it read in
numbers (files, bytes, encodings, undecodable bytes and files, docs, chars). Only a hub dataset name
needs a network; ``lmref.data.pipeline`` (cleaning to packing) takes the documents from here.

Usage::

    from lmref.data.sources import load_documents, load_text_files

    docs, stats = load_documents("stdlib")              # ~1.8 MB of docstrings, offline
    docs, stats = load_text_files("data/messy", separator="\n%%\n")
    docs, stats = load_documents("path/to/folder")      # a missing path: FileNotFoundError
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import sysconfig
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmref.data.encodings import DecodeConfig, decode_bytes


@dataclass(frozen=True)
class Document:
    """Text, where it came from (file path, ``module.qualname``, row), its language (ISO 639-1)."""

    text: str
    source: str
    language: str | None = None


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def load_text_files(
    paths: str | Path | Sequence[str | Path],
    suffixes: Sequence[str] = TEXT_SUFFIXES,
    on_decode_error: str = "replace",
    separator: str | None = None,
    encoding: str = "auto",
    fix_mojibake: bool = True,
) -> tuple[list[Document], dict]:
    """Read text files and folders (recursively, sorted) as documents, in any encoding.

    ``encoding="auto"`` detects each file's encoding (``lmref.data.encodings``: BOMs, UTF-16,
    GB18030, Big5, cp1252, ...; ``encodings``, and ``decoded_by_file`` for those not plain UTF-8);
    files no candidate fits are skipped and named (``undecodable_files``); ``"utf-8"`` is strict.
    Bad bytes of damaged UTF-8 (any non-UTF-8 byte when strict) are counted per file, then
    ``on_decode_error``: ``"replace"`` (U+FFFD), ``"drop"``, ``"skip"`` the file, or ``"raise"``.
    Empty and binary files are skipped and counted. ``separator`` (e.g. ``"\\n%%\\n"``) cuts a
    file into documents. ``FileNotFoundError`` for a missing path, ``ValueError`` if no text.
    """
    decoding = DecodeConfig(encoding, fix_mojibake=fix_mojibake, on_decode_error=on_decode_error)
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
    stats = Counter(
        files=len(files),
        bytes=0,
        empty_files=0,
        binary_files=0,
        files_with_undecodable_bytes=0,
        undecodable_bytes=0,
        skipped_undecodable_files=0,
    )
    undecodable: dict[str, int] = {}
    encodings: Counter = Counter()
    by_file: dict[str, dict] = {}  # files not read as plain UTF-8: encoding, confidence, how
    undecodable_files: list[str] = []  # no candidate encoding fits: skipped, never replaced
    docs: list[Document] = []
    for f in files:
        raw = f.read_bytes()
        stats["bytes"] += len(raw)
        if not raw.strip():
            stats["empty_files"] += 1
            continue
        try:
            decoded = decode_bytes(raw, decoding)
        except UnicodeDecodeError as e:
            raise UnicodeDecodeError(e.encoding, raw, e.start, e.end, f"{f}: {e.reason}") from None
        if decoded.how == "binary":
            stats["binary_files"] += 1
            continue
        encodings[decoded.encoding or "none"] += 1
        stats["mojibake_fixed_files"] += decoded.mojibake_fixed
        if decoded.how not in ("utf-8", "utf-8-damaged") or decoded.mojibake_fixed:
            by_file[str(f)] = {k: getattr(decoded, k) for k in ("encoding", "confidence", "how")}
        if decoded.how == "undecodable":
            undecodable_files.append(str(f))
            continue
        if decoded.undecodable_bytes:
            stats["files_with_undecodable_bytes"] += 1
            stats["undecodable_bytes"] += decoded.undecodable_bytes
            undecodable[str(f)] = decoded.undecodable_bytes
        text = decoded.text
        if text is None:
            stats["skipped_undecodable_files"] += 1
            continue
        parts = text.split(separator) if separator else [text]
        docs += [
            Document(t, f"{f}#{i}" if separator else str(f))
            for i, t in enumerate(parts)
            if t.strip()
        ]
    if undecodable:
        warnings.warn(
            f"{stats['undecodable_bytes']} bytes that are not UTF-8 in "
            f"{len(undecodable)} file(s) (on_decode_error={on_decode_error!r}): "
            f"{sorted(undecodable)[:5]}",
            stacklevel=2,
        )
    if undecodable_files:
        warnings.warn(f"no known encoding, skipped: {undecodable_files[:5]}", stacklevel=2)
    if not docs:
        raise ValueError(
            f"no text found in {[str(p) for p in paths]}: {len(files)} file(s) with "
            f"suffix {tuple(suffixes)}, {stats['empty_files']} empty, "
            f"{stats['binary_files']} binary, "
            f"{stats['skipped_undecodable_files'] + len(undecodable_files)} undecodable"
        )
    out = dict(
        stats,
        docs=len(docs),
        chars=sum(len(d.text) for d in docs),
        undecodable_by_file=undecodable,
        undecodable_files=undecodable_files,
        encodings=dict(encodings),
        decoded_by_file=by_file,
        on_decode_error=on_decode_error,
        encoding=encoding,
    )
    return docs, out


# Never parsed or imported: GUI and demo code, test suites, vendored installers, and easter eggs
# whose import has side effects (``antigravity`` opens a browser, ``this`` prints the Zen).
STDLIB_SKIP = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "pydoc_data",
        "antigravity",
        "this",
        "__phello__",
        "_pyrepl",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "readline",
        "_tkinter",
        "_curses",
        "_curses_panel",
    }
)


def _skip_module(name: str) -> bool:
    return (
        name in STDLIB_SKIP
        or name.startswith(("test", "_test", "xx", "_xx"))
        or name.endswith("_test")
    )


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
    script = (
        inspect.getsource(_compiled_docstrings_worker)
        + "\nimport json, sys\nprint(json.dumps(_compiled_docstrings_worker(json.loads(sys.argv[1]))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=300,
    )
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
            files = sorted(
                f
                for f in package.rglob("*.py")
                if not any(_skip_module(part) for part in f.relative_to(stdlib).parts[:-1])
                and not _skip_module(f.stem)
            )
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
    out = dict(
        stats, docs=len(docs), chars=sum(len(d.text) for d in docs), python=sys.version.split()[0]
    )
    return docs, out


def load_hf_dataset(
    name: str,
    split: str = "train",
    text_column: str = "text",
    max_docs: int | None = None,
    **load_kwargs: Any,
) -> tuple[list[Document], dict]:
    """Documents from any ``datasets`` dataset: a hub name (needs network) or a local path."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split, **load_kwargs)
    except Exception as e:
        raise RuntimeError(
            f"could not load dataset {name!r} (split {split!r}); offline, use a "
            f"local path or the 'stdlib' source: {e}"
        ) from e
    if text_column not in ds.column_names:
        raise ValueError(
            f"dataset {name!r} has no column {text_column!r}; columns: {ds.column_names}"
        )
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    docs = [
        Document(t, f"{name}[{i}]")
        for i, t in enumerate(ds[text_column])
        if isinstance(t, str) and t.strip()
    ]
    return docs, {
        "rows": len(ds),
        "docs": len(docs),
        "chars": sum(len(d.text) for d in docs),
        "dataset": name,
        "split": split,
    }


def looks_like_a_path(source: str | Path) -> bool:
    """Whether ``source`` can only mean a local path, not a hub name (``name`` or ``owner/name``).

    Absolute, ``./``, ``../`` or ``~`` paths, more than one ``/``, a text-file suffix, or a first
    component that is a local folder (``data/mesy`` beside a ``data/`` folder).
    """
    text = str(source)
    parts = Path(text).parts
    return (
        isinstance(source, Path)
        or Path(text).is_absolute()
        or text.startswith(("./", "../", "~", ".\\"))
        or text.count("/") > 1
        or "\\" in text
        or Path(text).suffix.lower() in TEXT_SUFFIXES
        or (len(parts) > 1 and Path(parts[0]).is_dir())
    )


def load_documents(source: str | Path = "stdlib", **kwargs: Any) -> tuple[list[Document], dict]:
    """Dispatch: ``"stdlib"``, ``"zh-fortunes"``, an existing file or folder, else a ``datasets`` name.

    A path that does not exist but can only be a path (see :func:`looks_like_a_path`) raises
    ``FileNotFoundError`` instead of being looked up on the hub.
    """
    if str(source) == "stdlib":
        return load_stdlib_docstrings(**kwargs)
    if str(source) == "zh-fortunes":  # Chinese, offline: Debian's fortunes-zh (lmref.data.corpora)
        from lmref.data.corpora import load_zh_fortunes

        return load_zh_fortunes(**kwargs)
    if Path(source).expanduser().exists():
        return load_text_files(Path(source).expanduser(), **kwargs)
    if looks_like_a_path(source):
        raise FileNotFoundError(
            f"no such file or folder: {source} (resolved to "
            f"{Path(source).expanduser().resolve()}); check the path, or call "
            "load_hf_dataset() directly for a hub data set of that name"
        )
    return load_hf_dataset(str(source), **kwargs)
