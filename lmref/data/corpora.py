"""Corpora beyond the English default, offline: Chinese from Debian's ``fortunes-zh``, and mixes.

``fortunes-zh`` (GPL-3.0+, ``apt-get install fortunes-zh``) installs three UTF-8 fortune files
under ``/usr/share/games/fortunes``: ``chinese`` (about 5,300 sayings, jokes and short essays,
2.1 MB), ``tang300`` (the 300 Tang poems) and ``song100`` (100 Song lyrics). Entries are separated
by a line ``%``; titles and authors are coloured with ANSI escape sequences, which are removed
here (they are terminal markup, not text). ``load_mix`` concatenates several sources (e.g. the
stdlib docstrings and these fortunes) and reports each one's numbers.

Usage::

    from lmref.data.corpora import load_mix, load_zh_fortunes

    docs, stats = load_zh_fortunes(max_docs=500)           # Document(text, "fortunes-zh/chinese#0")
    docs, stats = load_mix(["stdlib", "zh-fortunes"])      # stats["sources"]["zh-fortunes"]["docs"]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmref.data.sources import Document, load_documents

FORTUNES_DIR = Path("/usr/share/games/fortunes")
ZH_FORTUNE_FILES = ("chinese", "tang300", "song100")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # SGR colour codes such as ESC[33m ... ESC[m


def load_zh_fortunes(
    files: Sequence[str] = ZH_FORTUNE_FILES,
    folder: str | Path = FORTUNES_DIR,
    max_docs: int | None = None,
) -> tuple[list[Document], dict]:
    """The entries of Debian's Chinese fortune files as documents, ANSI escapes removed.

    Raises ``FileNotFoundError`` naming the package when a file is missing, ``ValueError`` for a
    file name that is not one of ``ZH_FORTUNE_FILES``.
    """
    unknown = sorted(set(files) - set(ZH_FORTUNE_FILES))
    if unknown:
        raise ValueError(f"unknown fortunes-zh file(s) {unknown}; choose from {ZH_FORTUNE_FILES}")
    docs: list[Document] = []
    per_file: dict[str, int] = {}
    escapes = 0
    for name in files:
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the Chinese corpus needs Debian's fortunes-zh package "
                "(sudo apt-get install fortunes-zh), or pass folder= where its files are"
            )
        text = path.read_text(encoding="utf-8")
        text, n = _ANSI.subn("", text)
        escapes += n
        entries = [e.strip() for e in re.split(r"\n%\n", text)]
        kept = [Document(e, f"fortunes-zh/{name}#{i}") for i, e in enumerate(entries) if e]
        per_file[name] = len(kept)
        docs += kept
    if max_docs is not None:
        docs = docs[:max_docs]
    return docs, {
        "docs": len(docs),
        "chars": sum(len(d.text) for d in docs),
        "docs_per_file": per_file,
        "ansi_escapes_removed": escapes,
        "folder": str(folder),
        "licence": "GPL-3.0+ (Debian fortunes-zh)",
    }


def load_mix(
    sources: Sequence[str], kwargs: dict[str, dict[str, Any]] | None = None
) -> tuple[list[Document], dict]:
    """Documents of every source in ``sources`` (anything ``load_documents`` takes), in order.

    ``kwargs`` maps a source to the keyword arguments of its loader (e.g.
    ``{"zh-fortunes": {"max_docs": 1000}}``). The stats hold each source's own stats.
    """
    if not sources:
        raise ValueError("load_mix needs at least one source, e.g. ['stdlib', 'zh-fortunes']")
    docs: list[Document] = []
    per_source: dict[str, dict] = {}
    for source in sources:
        part, stats = load_documents(source, **(kwargs or {}).get(source, {}))
        per_source[str(source)] = stats
        docs += part
    return docs, {
        "docs": len(docs),
        "chars": sum(len(d.text) for d in docs),
        "sources": per_source,
    }
