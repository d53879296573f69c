"""File hashing: the one way lmref fingerprints a file (checkpoint manifests, model folders).

Every byte is read (in 1 MiB chunks, so memory stays flat): a fingerprint made from a file's
size and first bytes misses a change in a late tensor, and two versions of a model would then
share one identity.

Usage::

    from lmref.core.hashing import sha256_of

    sha256_of("artifacts/base/model.safetensors")   # '3f1c...'
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20


def sha256_of(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
