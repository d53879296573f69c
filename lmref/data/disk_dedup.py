"""The dedup index on disk: exact (16 bytes of SHA-256 per distinct document) and MinHash-LSH near
duplicates (band keys and a signature per kept document) in one SQLite file, for
``lmref.data.stream``; the same decisions as ``lmref.data.clean.deduplicate`` without its RAM.

Usage::

    from lmref.data.disk_dedup import DiskDedupIndex
    from lmref.data.stream import StreamConfig

    index = DiskDedupIndex("index.sqlite", StreamConfig())
    if not index.is_exact_duplicate(text):
        sig = index.signature(text)
        if index.near_match(sig) is None:
            index.add(doc_number, source, sig)
    index_bytes = index.close()
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmref.data.text_rules import shingle_hashes

if TYPE_CHECKING:
    from lmref.data.stream import StreamConfig

_WHITESPACE = re.compile(r"\s+")  # the in-memory exact dedup's normalisation


# ----------------------------------------------------------------------------------------------


class DiskDedupIndex:
    """Exact and MinHash-LSH near-duplicate index in one SQLite file (see the module docstring).

    datasketch's ``MinHashLSH`` stores on Redis or Cassandra only, so the index is written here:
    the band/row choice is datasketch's own (``_optimal_param``) and the signatures are its
    ``MinHash`` values, so a candidate is confirmed exactly as in ``clean.deduplicate``."""

    def __init__(self, path: str | Path, config: StreamConfig):
        import numpy as np
        from datasketch import MinHash
        from datasketch.lsh import _optimal_param

        self.np, self.config, self.path = np, config, Path(path)
        self.bands, self.rows = _optimal_param(config.threshold, config.num_perm, 0.5, 0.5)
        proto = MinHash(num_perm=config.num_perm, seed=config.seed)
        # Built once: a MinHash per document would redraw its num_perm permutations each time
        self._perms, self._scheme = proto.permutations, proto.scheme
        self._minhash = MinHash
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            f"""PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
            PRAGMA cache_size=-{config.sqlite_cache_mb * 1024};
            CREATE TABLE IF NOT EXISTS exact (key BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS lsh (key INTEGER PRIMARY KEY, doc INTEGER);
            CREATE TABLE IF NOT EXISTS sig (doc INTEGER PRIMARY KEY, source TEXT, sig BLOB);"""
        )
        self.pending = 0

    def is_exact_duplicate(self, text: str) -> bool:
        """True when the whitespace-normalised text was seen before; remembers it otherwise."""
        key = hashlib.sha256(_WHITESPACE.sub(" ", text).strip(" ").encode()).digest()[:16]
        inserted = self.db.execute("INSERT OR IGNORE INTO exact VALUES (?)", (key,)).rowcount
        self._tick()
        return inserted == 0

    def signature(self, text: str) -> Any:
        c = self.config
        m = self._minhash(
            num_perm=c.num_perm,
            seed=c.seed,
            permutations=self._perms,
            scheme=self._scheme,
            hashfunc=int,  # shingle_hashes are datasketch's sha1_hash32 values already
        )
        m.update_batch(shingle_hashes(text[: c.max_shingle_chars], c.shingle_size))
        # datasketch's default scheme (affine32) makes 32-bit values: 4 bytes each
        return m.hashvalues.astype(self.np.uint32)

    def _band_keys(self, sig: Any) -> list[int]:
        r = self.rows
        return [
            int.from_bytes(
                hashlib.blake2b(
                    bytes([b]) + sig[b * r : (b + 1) * r].tobytes(), digest_size=8
                ).digest(),
                "big",
                signed=True,
            )
            for b in range(self.bands)
        ]

    def near_match(self, sig: Any) -> str | None:
        """Source of a kept document whose estimated Jaccard with ``sig`` is >= the threshold."""
        keys = self._band_keys(sig)
        marks = ",".join("?" * len(keys))
        for source, blob in self.db.execute(
            "SELECT source, sig FROM sig WHERE doc IN "
            f"(SELECT DISTINCT doc FROM lsh WHERE key IN ({marks})) ORDER BY doc",
            keys,
        ):
            other = self.np.frombuffer(blob, dtype=self.np.uint32)
            if float((other == sig).mean()) >= self.config.threshold:
                return source
        return None

    def add(self, doc: int, source: str, sig: Any) -> None:
        """Index a kept document (the first document of a band key stays its owner)."""
        self.db.executemany(
            "INSERT OR IGNORE INTO lsh VALUES (?, ?)", [(k, doc) for k in self._band_keys(sig)]
        )
        self.db.execute("INSERT INTO sig VALUES (?, ?, ?)", (doc, source, sig.tobytes()))

    def _tick(self) -> None:
        self.pending += 1
        if self.pending >= self.config.commit_every:
            self.db.commit()
            self.pending = 0

    def close(self) -> int:
        """Commit, close, and return the index file's size in bytes."""
        self.db.commit()
        self.db.close()
        return self.path.stat().st_size
