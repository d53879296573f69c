"""Folder manifests: the size and sha256 of every file an artifact folder holds, and the check.

Every folder lmref saves (a model, an adapter, a checkpoint, a data set) gets ``manifest.json``,
written last, once the folder is complete: ``{"files": {relative/name: {"bytes": n, "sha256":
hex}}}``, subfolders included, the manifest itself left out. ``verify_manifest`` says ``None``
when the folder is exactly that (no file missing, none added, none changed), else a message
naming the first files that differ. Training resumes only from a checkpoint that verifies; the
server serves only a folder that verifies. One format and one verifier serve both.

A manifest proves a folder is the one that was written, against a torn copy, a full disk or an
edit; someone who can rewrite the folder can rewrite its manifest too, so pin the manifest's own
sha256 (``sha256_of(folder / MANIFEST)``) where a registry records a release.

Usage::

    from lmref.core.manifest import verify_manifest, write_manifest

    write_manifest("artifacts/base")          # after the last write into the folder
    verify_manifest("artifacts/base")         # None, or 'artifacts/base/model.safetensors ...'

    python -m lmref.core.manifest write artifacts/base artifacts/full-ft   # existing folders
    python -m lmref.core.manifest verify artifacts/base                    # exit 1 on a mismatch
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from lmref.core.hashing import sha256_of

MANIFEST = "manifest.json"
SHOWN = 3  # problems a message names; the rest are counted


def _names(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, by its relative POSIX name, sorted."""
    names = (f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
    return sorted(n for n in names if n != MANIFEST)


def manifest_files(folder: str | os.PathLike) -> dict[str, dict]:
    """Relative name -> ``{"bytes", "sha256"}`` of every file under ``folder`` but the manifest."""
    folder = Path(folder)
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
        for name in _names(folder)
    }


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``folder/manifest.json`` for the folder as it is now; returns its path. Call it after
    the last write into the folder: a file written later fails ``verify_manifest``. The file is
    written beside and renamed into place, so a crash never leaves a half manifest."""
    folder = Path(folder)
    text = json.dumps({"files": manifest_files(folder)}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the folder's readers read it too
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / MANIFEST


def has_manifest(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def verify_manifest(folder: str | os.PathLike, hashes: bool = True) -> str | None:
    """``None`` when ``folder`` holds exactly the files of its manifest, each of its size and
    sha256; else why not, naming the files: the manifest missing or unreadable, a file missing,
    one not in the manifest (added later), another size, another sha256. ``hashes=False`` checks
    names and sizes only (no file is read: a quick first look)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {str(name): (int(e["bytes"]), str(e["sha256"])) for name, e in files.items()}
    except FileNotFoundError:
        return (
            f"{folder / MANIFEST} is missing (the write did not finish, or it predates manifests)"
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{folder / MANIFEST} is unreadable ({type(e).__name__}: {e})"
    present = set(_names(folder))
    problems = [f"{folder / n} is missing" for n in sorted(set(expected) - present)]
    problems += [f"{folder / n} is not in the manifest" for n in sorted(present - set(expected))]
    for name, (size, _) in sorted(expected.items()):  # sizes first: no file read yet
        found = (folder / name).stat().st_size if name in present else size
        if found != size:
            problems.append(f"{folder / name} has {found} bytes, the manifest says {size}")
    if not problems and hashes:
        problems = [
            f"{folder / name} does not match its sha256 in the manifest"
            for name, (_, digest) in sorted(expected.items())
            if sha256_of(folder / name) != digest
        ]
    if not problems:
        return None
    more = len(problems) - SHOWN
    return "; ".join(problems[:SHOWN]) + (f"; and {more} more" if more > 0 else "")


def main(argv: list[str] | None = None) -> int:
    """``write FOLDER...`` (0) or ``verify FOLDER...`` (1 when any folder fails, naming why)."""
    parser = argparse.ArgumentParser(
        prog="python -m lmref.core.manifest",
        description="Write or verify the sha256 manifest (manifest.json) of artifact folders.",
    )
    parser.add_argument("action", choices=["write", "verify"])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder}: no such folder")
        if args.action == "write":
            print(f"wrote {write_manifest(folder)}")
            continue
        reason = verify_manifest(folder)
        print(f"{folder}: {'ok' if reason is None else reason}")
        failed += reason is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
